"""The router: OpenAI-compatible HTTP and gRPC dispatch of workflow LLM calls, with tracing.

Run it, register engines, point any OpenAI client at it::

    scepsy router --http-port 8000 --port 50051           # or: python -m services.router
    scepsy endpoints add llama-8b http://10.0.0.5:8000    # live: no router restart needed

    client = openai.OpenAI(base_url="http://router:8000/v1", api_key="...")
    with workflow_request("rag") as request:              # services.router.client
        client.chat.completions.create(model="llama-8b", messages=[...],
                                       extra_headers=request.headers)

LangGraph / LangChain: ``ChatOpenAI(base_url="http://router:8000/v1", model=...,
http_client=tagged_http_client(), http_async_client=tagged_async_http_client())`` and run each
graph invocation inside ``workflow_request(name)``: every call the graph makes carries the
request's tags. Native clients use gRPC ``scepsy.v1.Router`` (``RouterClient``).

Modules: ``config`` (RouterConfig), ``service`` (composition, start/stop), ``http_api`` and
``grpc_api`` (front ends), ``http_server`` (the lean HTTP/1.1 server under ``http_api``),
``schema`` (request validation, workflow identity), ``dispatch`` (admission, queue, failover,
deadlines, tracing of each call), ``upstream`` (one engine call, SSE), ``http1`` (the lean
HTTP/1.1 client under it), ``registry`` (replicas from Redis, health), ``tracing`` (batched
trace writer), ``metrics``, ``auth``, ``errors``, ``client`` (workflow tagging, gRPC clients),
``scripted_upstream`` (an upstream that answers at once, for the benchmark and for failures a
real engine cannot produce on demand). Routing policies are pure code in ``services.core.routing``.
"""
