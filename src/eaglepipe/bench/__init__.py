"""The bench stage's parts: prompts, the engines measured (native / sglang / url), the sweep, metrics, reports and
plots."""
