"""Measures of what a compile cost: per-layer error against the float model (error_report),
perplexity over a token stream (perplexity), the HTML report of an artifact (html_report)."""
