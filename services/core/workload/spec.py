"""The deployment spec: which workflows to serve, at what rate, with which models, on what cluster.

YAML or JSON, version 1::

    version: 1
    fraction_unit: 4            # k: GPU fractions are multiples of 1/k (default 4)
    rho: 0.9                    # utilisation cap: plans need throughput >= rate / rho (default 0.9)
    cluster: cluster.yaml       # a cluster YAML path, a cluster document (with nodes), or
                                # the shorthand {gpu_type: H100-SXM, gpus: 8}
    models:                     # deployment name (the "model" in calls and traces) ->
      llama-8b: meta-llama/Llama-3.1-8B     # a catalogue name or a path ending in .json
      prm: {config: models/prm}             # or {config: PATH}: a config.json or its directory
      small:                                # the long form says what the engines serve too
        model: Qwen/Qwen3-0.6B              # a catalogue name, or config: PATH | {config.json}
        weights: ./models/qwen3-0.6b        # Hugging Face id or local path (default: the
                                            #   catalogue name, or the config's directory)
        served_name: small                  # the name clients call (default: the key)
        max_model_len: 8192                 # optional
        engine_args: [--enable-prefix-caching]   # extra `vllm serve` arguments
    workflows:
      - name: rag
        trace: traces/rag.jsonl # statistics from a trace (the workflow of the same name,
        trace_workflow: rag     #   or of trace_workflow); ``trace: router``: the router's
                                #   recorded trace (planner service only)
        rate: 4.0               # target requests/s
        weight: 1.0             # weight of its latency in the objective (default 1)
      - name: agent
        rate: 1.5
        stats:                  # or inline statistics
          tool_time: 0.4        # s per request (default 0)
          stages: [[llama-8b], [prm]]   # optional; default: serial in listed order
          llms:
            llama-8b: {n: 3, p: 1.0, prompt_tokens: 900, completion_tokens: 150}
            prm: {n: 3, prompt_tokens: 1100, completion_tokens: 1}   # p defaults to 1

Relative paths are relative to the spec file. A ``weights`` value is a local path when it starts
with ``/``, ``./``, ``../`` or ``~``; anything else is a Hugging Face id. A local path must exist
where the spec is read from disk, and becomes absolute. ``parse_spec`` is pure: files a spec
refers to are read through a ``SpecFiles`` the caller hands in (``load_spec`` passes one reading
from disk).
Every error names the source and the field path, e.g. ``spec.yaml: workflows[1].rate: must be a
positive number, got -1``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from services.core.cluster.declared import load_cluster, parse_cluster
from services.core.cluster.inventory import NodeInventory
from services.core.cluster.models import (
    ModelSpec,
    load_hf_config,
    model_spec,
    spec_from_hf_config,
)
from services.core.errors import InvalidInputError, NotFoundError, ScepsyError
from services.core.workload.demand import LlmDemand, WorkflowDemand
from services.core.workload.stats import WorkflowStats, workflow_stats
from services.core.workload.trace import read_trace

SPEC_VERSION = 1
DEFAULT_FRACTION_UNIT = 4
DEFAULT_RHO = 0.9

TokenMix = tuple[tuple[int, int], ...]  # (prompt, completion) token pairs
# ``trace: router`` names the router's recorded trace (in Redis), which the planner service reads
RECORDED_TRACE = "router"


@dataclass(frozen=True, slots=True)
class WorkflowTarget:
    """One workflow to serve: its demand on the LLMs and its target rate."""

    name: str
    rate: float  # requests/s
    weight: float
    demand: WorkflowDemand
    mixes: dict[str, TokenMix] = field(default_factory=dict)  # model -> its request mix
    source: str = "inline"  # the trace path, or "inline"


@dataclass(frozen=True, slots=True)
class ModelServing:
    """What one model's engines serve and how they are launched."""

    model: str  # deployment name
    weights: str  # Hugging Face id, or an absolute local path
    served_name: str  # the name clients call
    max_model_len: int | None = None  # None: the engine's default
    engine_args: tuple[str, ...] = ()  # extra ``vllm serve`` arguments

    @property
    def local(self) -> bool:
        return is_local_path(self.weights)


def is_local_path(weights: str) -> bool:
    return weights.startswith(("/", "./", "../", "~"))


# ``vllm serve`` arguments Scepsy sets from the plan: a spec may not set them in engine_args
RESERVED_ENGINE_ARGS = (
    "--host",
    "--port",
    "--model",
    "--served-model-name",
    "--tensor-parallel-size",
    "-tp",
    "--gpu-memory-utilization",
    "--max-model-len",
)


@dataclass(frozen=True, slots=True)
class Spec:
    workflows: tuple[WorkflowTarget, ...]
    models: dict[str, ModelSpec]  # deployment name -> architecture
    nodes: tuple[NodeInventory, ...]
    fraction_unit: int = DEFAULT_FRACTION_UNIT
    rho: float = DEFAULT_RHO
    serving: dict[str, ModelServing] = field(default_factory=dict)  # deployment name -> serving

    @property
    def gpu_type(self) -> str:
        return self.nodes[0].gpus[0].gpu_type

    @property
    def gpu_count(self) -> int:
        return sum(len(n.gpus) for n in self.nodes)

    @property
    def target_rates(self) -> dict[str, float]:
        return {w.name: w.rate for w in self.workflows}

    def token_mix(self, model: str, size: int = 1000) -> TokenMix:
        """About ``size`` (prompt, completion) pairs of ``model``'s calls over all workflows.

        Each workflow contributes in proportion to the calls/s it sends to the model
        (rate x n), its samples taken evenly spaced (repeated when it has fewer): the mix the
        engine will really see, deterministic. Empty when no workflow calls the model.
        """
        parts = [
            (w.rate * d.n, w.mixes[model])
            for w in self.workflows
            for d in w.demand.llms
            if d.model == model and w.mixes.get(model)
        ]
        total = sum(weight for weight, _ in parts)
        pairs: list[tuple[int, int]] = []
        for weight, samples in parts:
            count = max(1, round(size * weight / total))
            pairs.extend(samples[i * len(samples) // count] for i in range(count))
        return tuple(pairs)


class SpecFiles(Protocol):
    """Reads the files a spec refers to (paths as written in the spec)."""

    def trace_stats(self, path: str) -> tuple[WorkflowStats, ...]: ...

    def cluster(self, path: str) -> tuple[NodeInventory, ...]: ...

    def model_config(self, path: str) -> ModelSpec: ...

    def weights(self, path: str) -> str:
        """A local weights path made absolute; raises ``NotFoundError`` when it does not exist."""
        ...


class DiskFiles:
    """``SpecFiles`` reading from disk, relative paths resolved against ``base``."""

    def __init__(self, base: Path) -> None:
        self.base = base

    def trace_stats(self, path: str) -> tuple[WorkflowStats, ...]:
        if path == RECORDED_TRACE:
            raise InvalidInputError(
                "the router's recorded trace is read by the planner service: plan through it "
                "(`scepsy up`, then `scepsy plan`), or export it with `scepsy trace export`"
            )
        return workflow_stats(read_trace(self.base / path))

    def cluster(self, path: str) -> tuple[NodeInventory, ...]:
        return load_cluster(self.base / path)

    def model_config(self, path: str) -> ModelSpec:
        return load_hf_config(self.base / path)

    def weights(self, path: str) -> str:
        resolved = (self.base / Path(path).expanduser()).resolve()
        if not resolved.exists():
            raise NotFoundError(f"weights path {resolved} does not exist")
        return str(resolved)


def load_spec(path: str | Path) -> Spec:
    """Read a spec file (YAML or JSON) and everything it refers to."""
    import yaml  # only the file loader needs it; JSON is YAML

    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidInputError(f"{p}: cannot read spec: {exc.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{p}: not valid YAML: {exc}") from None
    except RecursionError:
        raise InvalidInputError(f"{p}: nested too deeply to be a spec") from None
    return parse_spec(doc, source=p.name, files=DiskFiles(p.parent))


def parse_spec(doc: Any, *, source: str = "spec", files: SpecFiles | None = None) -> Spec:
    """Validate a parsed spec document. ``files`` is needed only when the spec refers to files."""
    r = _Reader(source, files)
    top = r.mapping(
        doc, "top level", {"version", "fraction_unit", "rho", "cluster", "models", "workflows"}
    )
    version = top.get("version")
    if type(version) is not int or version != SPEC_VERSION:
        raise r.fail("version", f"must be {SPEC_VERSION}, got {version!r}")
    k = top.get("fraction_unit", DEFAULT_FRACTION_UNIT)
    if type(k) is not int or k < 1:
        raise r.fail("fraction_unit", f"must be a positive integer, got {k!r}")
    rho = r.number(top.get("rho", DEFAULT_RHO), "rho")
    if not 0 < rho <= 1:
        raise r.fail("rho", f"must be in (0, 1], got {rho!r}")
    if "cluster" not in top:
        raise r.fail("cluster", "missing")
    nodes = r.cluster(top["cluster"])
    models, serving = r.models(top.get("models"))
    raw_workflows = top.get("workflows")
    if not isinstance(raw_workflows, list) or not raw_workflows:
        raise r.fail("workflows", f"must be a non-empty list, got {raw_workflows!r}")
    workflows: list[WorkflowTarget] = []
    for i, raw in enumerate(raw_workflows):
        target = r.workflow(raw, f"workflows[{i}]", models)
        if any(w.name == target.name for w in workflows):
            raise r.fail(f"workflows[{i}].name", f"duplicate workflow {target.name!r}")
        workflows.append(target)
    return Spec(tuple(workflows), models, nodes, k, rho, serving)


_MODEL_FIELDS = {"model", "config", "weights", "served_name", "max_model_len", "engine_args"}
_WORKFLOW_FIELDS = {"name", "rate", "weight", "trace", "trace_workflow", "stats"}
_STATS_FIELDS = {"tool_time", "stages", "llms"}
_LLM_FIELDS = {"n", "p", "prompt_tokens", "completion_tokens"}


def _config_dir(path: str) -> str:
    """The directory of a model's config (a Hugging Face layout keeps the weights there), as a
    local path."""
    directory = (path.rsplit("/", 1)[0] if "/" in path else ".") if path.endswith(".json") else path
    return directory if is_local_path(directory) else f"./{directory}"


class _Reader:
    """Field readers; every error is ``<source>: <field path>: <problem>``."""

    def __init__(self, source: str, files: SpecFiles | None) -> None:
        self.source = source
        self.files = files

    def fail(self, where: str, problem: str) -> InvalidInputError:
        return InvalidInputError(f"{self.source}: {where}: {problem}")

    def mapping(self, value: Any, where: str, allowed: set[str]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(where, f"must be a mapping, got {type(value).__name__}")
        unknown = sorted(str(key) for key in set(value) - allowed)
        if unknown:
            prefix = "" if where == "top level" else f"{where}."
            raise self.fail(f"{prefix}{unknown[0]}", f"unknown field (allowed: {sorted(allowed)})")
        return value

    def number(self, value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(where, f"must be a number, got {value!r}")
        return float(value)

    def positive(self, value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise self.fail(where, f"must be a positive number, got {value!r}")
        return float(value)

    def tokens(self, value: Any, where: str) -> int:
        if type(value) is not int or value < 0:
            raise self.fail(where, f"must be a non-negative integer, got {value!r}")
        return value

    def text(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, f"must be a non-empty string, got {value!r}")
        return value

    def need_files(self, where: str) -> SpecFiles:
        if self.files is None:
            raise self.fail(where, "refers to a file, but no file reader was given (use load_spec)")
        return self.files

    def cluster(self, value: Any) -> tuple[NodeInventory, ...]:
        try:
            if isinstance(value, str):
                nodes = self.need_files("cluster").cluster(value)
            elif isinstance(value, Mapping) and "nodes" in value:
                nodes = parse_cluster(value, source=f"{self.source}: cluster")
            else:
                short = self.mapping(value, "cluster", {"gpu_type", "gpus"})
                doc = {"version": 1, "nodes": [{"name": "node", **short}]}
                nodes = parse_cluster(doc, source=f"{self.source}: cluster")
        except InvalidInputError as exc:
            if str(exc).startswith(self.source):
                raise
            raise self.fail("cluster", str(exc)) from None
        types = sorted({g.gpu_type for n in nodes for g in n.gpus})
        if len(types) != 1:
            raise self.fail("cluster", f"must have one GPU type, got {types}")
        return nodes

    def models(self, value: Any) -> tuple[dict[str, ModelSpec], dict[str, ModelServing]]:
        if not isinstance(value, Mapping) or not value:
            raise self.fail("models", f"must be a non-empty mapping, got {value!r}")
        models: dict[str, ModelSpec] = {}
        serving: dict[str, ModelServing] = {}
        for name, ref in value.items():
            where = f"models.{name}"
            self.text(name, "models")
            entry: Mapping[str, Any] = {}
            try:
                if isinstance(ref, str) and not ref.endswith(".json"):
                    models[name] = model_spec(ref)
                    weights: str | None = ref
                elif isinstance(ref, str):
                    models[name] = self.need_files(where).model_config(ref)
                    weights = _config_dir(ref)
                else:
                    entry = self.mapping(ref, where, _MODEL_FIELDS)
                    models[name], weights = self.architecture(entry, where)
            except ScepsyError as exc:
                if str(exc).startswith(self.source):
                    raise
                raise self.fail(where, str(exc)) from None
            serving[name] = self.serving(name, entry, weights, where)
        return models, serving

    def architecture(self, entry: Mapping[str, Any], where: str) -> tuple[ModelSpec, str | None]:
        """The architecture of a long-form models entry and its default weights."""
        if ("model" in entry) == ("config" in entry):
            raise self.fail(where, "needs exactly one of 'model' (a catalogue name) and 'config'")
        if "model" in entry:
            name = self.text(entry["model"], f"{where}.model")
            return model_spec(name), name
        config = entry["config"]
        if isinstance(config, Mapping):
            return spec_from_hf_config(
                dict(config), where.split(".", 1)[1], f"{where}.config"
            ), None
        path = self.text(config, f"{where}.config")
        return self.need_files(f"{where}.config").model_config(path), _config_dir(path)

    def serving(
        self, name: str, entry: Mapping[str, Any], weights: str | None, where: str
    ) -> ModelServing:
        if "weights" in entry:
            weights = self.text(entry["weights"], f"{where}.weights")
        if weights is None:
            raise self.fail(f"{where}.weights", "missing (an inline config has no default)")
        if is_local_path(weights) and self.files is not None:
            try:
                weights = self.files.weights(weights)
            except ScepsyError as exc:
                raise self.fail(f"{where}.weights", f"model {name!r}: {exc}") from None
        elif is_local_path(weights) and not weights.startswith("/"):
            raise self.fail(
                f"{where}.weights",
                f"model {name!r}: relative path {weights!r} needs the spec file to resolve it",
            )
        served = self.text(entry.get("served_name", name), f"{where}.served_name")
        max_len = entry.get("max_model_len")
        if max_len is not None and (type(max_len) is not int or max_len < 1):
            raise self.fail(
                f"{where}.max_model_len", f"must be a positive integer, got {max_len!r}"
            )
        raw_args = entry.get("engine_args", [])
        if not isinstance(raw_args, list) or not all(isinstance(a, str) for a in raw_args):
            raise self.fail(f"{where}.engine_args", f"must be a list of strings, got {raw_args!r}")
        for arg in raw_args:
            flag = arg.split("=", 1)[0]
            if flag in RESERVED_ENGINE_ARGS:
                raise self.fail(
                    f"{where}.engine_args",
                    f"{arg!r} is set by Scepsy from the plan (reserved: "
                    f"{', '.join(RESERVED_ENGINE_ARGS)}); use max_model_len for the context length",
                )
        return ModelServing(name, weights, served, max_len, tuple(raw_args))

    def workflow(self, raw: Any, where: str, models: Mapping[str, ModelSpec]) -> WorkflowTarget:
        w = self.mapping(raw, where, _WORKFLOW_FIELDS)
        name = self.text(w.get("name"), f"{where}.name")
        rate = self.positive(w.get("rate"), f"{where}.rate")
        weight = self.positive(w.get("weight", 1.0), f"{where}.weight")
        if ("trace" in w) == ("stats" in w):
            raise self.fail(where, "needs exactly one of 'trace' and 'stats'")
        if "trace" in w:
            demand, mixes, source = self.traced(w, where, name)
        else:
            demand, mixes = self.inline(w["stats"], f"{where}.stats", name)
            source = "inline"
        for d in demand.llms:
            if d.model not in models:
                field_name = f"{where}.trace" if "trace" in w else f"{where}.stats.llms.{d.model}"
                raise self.fail(
                    field_name, f"model {d.model!r} is not declared in models ({sorted(models)})"
                )
        return WorkflowTarget(name, rate, weight, demand, mixes, source)

    def traced(
        self, w: Mapping[str, Any], where: str, name: str
    ) -> tuple[WorkflowDemand, dict[str, TokenMix], str]:
        path = self.text(w["trace"], f"{where}.trace")
        wanted = self.text(w.get("trace_workflow", name), f"{where}.trace_workflow")
        try:
            found = self.need_files(f"{where}.trace").trace_stats(path)
        except InvalidInputError as exc:
            raise self.fail(f"{where}.trace", str(exc)) from None
        stats = next((s for s in found if s.workflow == wanted), None)
        if stats is None or stats.requests == 0:
            names = [s.workflow for s in found if s.requests]
            raise self.fail(
                f"{where}.trace", f"no requests of workflow {wanted!r} in {path} (found: {names})"
            )
        demand = WorkflowDemand.from_stats(stats)
        demand = WorkflowDemand(name, demand.llms, demand.tool_time, demand.stages)
        mixes = {m.model: m.sample for m in stats.llms if m.n > 0}
        return demand, mixes, path

    def inline(self, raw: Any, where: str, name: str) -> tuple[WorkflowDemand, dict[str, TokenMix]]:
        s = self.mapping(raw, where, _STATS_FIELDS)
        tool_time = self.number(s.get("tool_time", 0.0), f"{where}.tool_time")
        if tool_time < 0:
            raise self.fail(f"{where}.tool_time", f"must be >= 0, got {tool_time!r}")
        raw_llms = s.get("llms")
        if not isinstance(raw_llms, Mapping) or not raw_llms:
            raise self.fail(f"{where}.llms", f"must be a non-empty mapping, got {raw_llms!r}")
        llms: list[LlmDemand] = []
        mixes: dict[str, TokenMix] = {}
        for model, entry in raw_llms.items():
            at = f"{where}.llms.{model}"
            e = self.mapping(entry, at, _LLM_FIELDS)
            n = self.positive(e.get("n"), f"{at}.n")
            p = self.number(e.get("p", 1.0), f"{at}.p")
            if p < 1:
                raise self.fail(f"{at}.p", f"must be >= 1, got {p!r}")
            prompt = self.tokens(e.get("prompt_tokens"), f"{at}.prompt_tokens")
            completion = self.tokens(e.get("completion_tokens"), f"{at}.completion_tokens")
            llms.append(LlmDemand(str(model), n, p))
            mixes[str(model)] = ((prompt, completion),)
        stages = self.stages(s.get("stages"), f"{where}.stages", list(mixes))
        return WorkflowDemand(name, tuple(llms), tool_time, stages), mixes

    def stages(self, raw: Any, where: str, models: list[str]) -> tuple[tuple[str, ...], ...]:
        if raw is None:
            return ()
        ok = isinstance(raw, list) and all(
            isinstance(st, list) and st and all(isinstance(m, str) for m in st) for st in raw
        )
        listed = [m for st in raw for m in st] if ok else []
        if not ok or sorted(listed) != sorted(models):
            raise self.fail(
                where,
                f"must be a list of lists partitioning the llms {sorted(models)}, got {raw!r}",
            )
        return tuple(tuple(st) for st in raw)
