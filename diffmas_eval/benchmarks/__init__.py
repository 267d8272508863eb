"""Benchmarks behind the mas_* lm-eval tasks: data sources (`sources`), answer extraction (`extract`), scoring
(`scoring`) and guarded evalplus code execution (`code_exec`)."""
