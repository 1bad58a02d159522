"""Measures of what a compile cost: per-layer error against the float model (error_report),
perplexity over a token stream and paired float-vs-quantized comparisons on it (perplexity,
metrics), MMLU accuracy (mmlu), the HTML report of an artifact (html_report)."""
