"""Scepsy: serve multi-LLM agentic workflows on GPU clusters."""
