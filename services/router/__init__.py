"""The router: OpenAI-compatible HTTP and gRPC dispatch of workflow LLM calls, with tracing."""
