"""A run: the pipeline that makes it, its folder and record, memory figures, report, auto-tune."""
