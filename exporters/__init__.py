"""Model exporters: Hugging Face -> ONNX, and deployable bundles. No Qt here."""
