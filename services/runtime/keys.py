"""The Redis key schema, in one place. Every key starts with the namespace (default "scepsy") and
the schema version, so several deployments (or test runs) can share one Redis.

| key | type | holds |
|---|---|---|
| {ns}:v1:node:{name} | string, TTL | a ``scepsy.v1.Node`` (protobuf bytes), expiring |
| {ns}:v1:nodes | set | names of registered nodes (pruned of expired ones on read) |
| {ns}:v1:events | pub/sub channel | JSON announcements: ``endpoints_changed`` (model; the router
  refreshes its replicas), ``plan_changed`` (plan id; node agents will reconcile their engines) |
| {ns}:v1:trace | stream, capped | router trace calls (field ``call``: one JSON line) |
| {ns}:v1:profile:{field} | string | a ``scepsy.v1.Profile``; field = ProfileKey.redis_field() |
| {ns}:v1:plan:{id} | string, immutable | a ``scepsy.v1.Plan`` |
| {ns}:v1:plans | sorted set | plan ids by creation time |
| {ns}:v1:plan:current | string | id of the current plan, swapped atomically |
| {ns}:v1:endpoints:{model} | hash | replica id -> JSON {"url": engine base URL, "weight": w} |
| {ns}:v1:endpoint-models | set | models that have an ``endpoints:{model}`` hash |
| {ns}:v1:endpoints-epoch | string | id of the endpoint table, set by its first write and never
  changed while the table exists: a Redis that lost its data has none (or, re-filled, another) |
| {ns}:v1:engines:{node} | hash, TTL | engine id -> a ``scepsy.v1.Engine`` (protobuf bytes): the
  engines the node's agent runs, replaced whole by the agent, expiring with its heartbeats |
| {ns}:v1:engine-nodes | set | nodes that have an ``engines:{node}`` hash (pruned on read) |
| {ns}:v1:service:{id} | string, TTL | a running service process: JSON ``ServiceRecord`` |
| {ns}:v1:services | set | ids of registered service processes (pruned of expired ones on read) |
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA = "v1"


@dataclass(frozen=True, slots=True)
class Keys:
    namespace: str = "scepsy"

    @property
    def _root(self) -> str:
        return f"{self.namespace}:{SCHEMA}"

    def node(self, name: str) -> str:
        return f"{self._root}:node:{name}"

    @property
    def nodes(self) -> str:
        return f"{self._root}:nodes"

    @property
    def events(self) -> str:
        return f"{self._root}:events"

    @property
    def trace(self) -> str:
        return f"{self._root}:trace"

    def profile(self, field: str) -> str:
        return f"{self._root}:profile:{field}"

    def plan(self, plan_id: str) -> str:
        return f"{self._root}:plan:{plan_id}"

    @property
    def plans(self) -> str:
        return f"{self._root}:plans"

    @property
    def current_plan(self) -> str:
        return f"{self._root}:plan:current"

    def endpoints(self, model: str) -> str:
        return f"{self._root}:endpoints:{model}"

    @property
    def endpoint_models(self) -> str:
        return f"{self._root}:endpoint-models"

    @property
    def endpoints_epoch(self) -> str:
        return f"{self._root}:endpoints-epoch"

    def engines(self, node: str) -> str:
        return f"{self._root}:engines:{node}"

    @property
    def engine_nodes(self) -> str:
        return f"{self._root}:engine-nodes"

    def service(self, service_id: str) -> str:
        return f"{self._root}:service:{service_id}"

    @property
    def services(self) -> str:
        return f"{self._root}:services"
