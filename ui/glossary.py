"""Technical terms in plain words: the tooltips shown wherever a term appears in the app."""

from workbench.quality.verdict import scale_words

TERMS = {
    "INT4": "Storing each weight of the model in 4 bits instead of 32: about eight times less "
    "space for those weights, at some cost in accuracy.",
    "ONNX": "A common file format for models. ONNX Runtime runs it on most computers without Python "
    "libraries such as PyTorch.",
    "architecture": "The model's design, as its makers named it (for example LlamaForCausalLM), and how "
    "many layers it stacks; the workbench reads the common text-writing designs.",
    "parameters": "The numbers the model learned. More parameters usually means a more capable, "
    "bigger and slower model.",
    "context length": "How much text (in tokens, roughly word pieces) the model can look at at once.",
    "fp32": "32-bit floating point numbers: the full-precision form the model starts from.",
    "RAM": "The computer's working memory. A model has to fit in it, with room left for everything else.",
    "GPTQ": "A careful way to round weights: it reads example text and corrects each rounding error "
    "using the weights not yet rounded. Slower, and usually the best quality.",
    "RTN": "Round to nearest: each weight is simply rounded to the closest 4-bit value. Fast, and "
    "loses the most quality.",
    "HQQ": "Half-quadratic quantization: tunes each block's scale and zero point to fit the weights "
    "better than plain rounding. Needs no example text.",
    "AWQ": "Activation-aware rounding: reads example text to find the inputs that matter most and "
    "scales their weights up before rounding, so they lose less. Needs example text.",
    "fused attention": "Each layer's attention steps are merged into one operation ONNX Runtime "
    "runs faster. The answers stay the same.",
    "method": "How the 4-bit values are chosen for the weights.",
    "block size": "How many weights share one scale. Smaller blocks follow the weights more closely "
    "(better quality) but store more scales (a bigger file).",
    "symmetric": "Symmetric: each block's 4-bit values are centred on zero (no zero point stored). "
    "Asymmetric blocks also store a zero point: slightly bigger, often more accurate.",
    "accuracy level": "The precision ONNX Runtime uses for the inputs of INT4 layers: 4 turns them "
    "into 8-bit integers (fastest on CPUs, tiny extra error); 1 keeps 32-bit floats (slowest, most "
    "exact); 0 leaves the choice to the runtime.",
    "embeddings": "The table that turns each token into numbers at the model's input. Often one of "
    "the biggest single pieces of a small model.",
    "lm_head": "The output layer that scores every possible next token. Sensitive to rounding; "
    "keeping it at 8 bits costs some size and saves quality.",
    "eight bit": "Layers kept at 8 bits instead of 4: twice their 4-bit size, nearly lossless. "
    "Names with wildcards, e.g. lm_head or model.layers.0.*",
    "full precision": "Layers left untouched at 32 bits. Names with wildcards, e.g. model.layers.0.*",
    "act order": "GPTQ option: round the most important columns of each weight first. Sometimes "
    "better quality, a little slower.",
    "calibration": "Example text the model reads while it is being shrunk, so that the rounding "
    "keeps what matters for text like yours. GPTQ, AWQ and the search for sensitive layers use it.",
    "data-free": "Without a file: the model writes its own example text, which it then reads back. A model "
    "under 0.5 billion parameters writes two to four times as much, which costs it little and rounds it better.",
    "tokens": "Pieces of words the model reads and writes; a token is about three quarters of an "
    "English word.",
    "perplexity": "How surprised the model is by a text: lower is better. " + scale_words(),
    "top-1 agreement": "How often both models pick the same most likely next token. 100 % means "
    "they would write the same text.",
    "KL": "Kullback-Leibler divergence: how far apart the two models' next-token probabilities are "
    "on average. 0 means identical.",
    "TTFT": "Time to first token: how long you wait before the answer starts to appear.",
    "tok/s": "Tokens per second: how fast the answer is written once it has started.",
    "peak memory": "The most RAM the model used while answering.",
    "temperature": "Randomness of the answer: 0 always picks the most likely token, higher values "
    "are more varied.",
    "top-p": "Pick only among the most likely tokens that together make up this share of the "
    "probability (1 = no limit).",
    "top-k": "Pick only among this many most likely tokens (0 = no limit).",
    "repetition penalty": "Above 1 discourages the model from repeating itself.",
    "seed": "Makes random choices repeatable: the same seed gives the same answer.",
    "stop strings": "The answer ends as soon as it contains one of these texts.",
    "JSON schema": "Forces the answer to be JSON with this structure.",
    "similarity": "How alike the two answers read, letter by letter (chrF): 100 % means the same text.",
    "first divergence": "Where the INT4 answer first picks a different token than the original; "
    "from there on the two answers usually go different ways.",
    "provider": "Where the models run: on the processor (CPU) or on an NVIDIA graphics card (CUDA).",
    "system prompt": "Instructions the model reads before your prompt, e.g. 'Answer in one sentence.'",
    "max tokens": "The longest answer allowed, in tokens.",
    "bits per weight": "Average storage per parameter, scales and zero points included "
    "(32 for the original).",
}


def tip(term: str) -> str:
    return TERMS[term]
