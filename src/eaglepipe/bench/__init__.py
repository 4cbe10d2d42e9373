"""The bench stage's parts: prompts, backends (native / sglang / url), the sweep, metrics, reports and plots."""
