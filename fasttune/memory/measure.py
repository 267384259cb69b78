"""What a live model really holds, part by part, to set beside the plan (fasttune.memory.plan).

Parameters, gradients and optimizer states are read from the live objects; activations are the
tensors autograd keeps for backward, counted by ``saved_tensors_hooks`` (each storage once,
parameters left out); the peak of a whole training step comes from PyTorch's profiler, which
records every CPU allocation and free (on CUDA, ``torch.cuda.max_memory_allocated``). Used by the
tests' CPU proof, ``bench/activation_census.py`` and ``bench/gpu_check.py``. Imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class SavedTensors:
    """``with SavedTensors(model) as saved: loss = model(...)``: ``saved.total`` is the bytes of the
    distinct storages autograd holds for backward when the block ends (the model's parameters,
    which are held anyway, left out). A tensor saved by a part of the graph that was dropped inside
    the block (freed, its address free for reuse) is not counted."""

    def __init__(self, model):
        self._skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._live: dict[int, list[int]] = {}  # storage address -> [bytes, saved references alive]
        self._context = None
        self.total = 0

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._skip or storage.device.type == "meta":
            return tensor
        self._live.setdefault(key, [storage.nbytes(), 0])[1] += 1
        return _Held(tensor, key, self._live)

    def __enter__(self) -> "SavedTensors":
        import torch

        self._context = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)
        self.total = sum(size for size, _ in self._live.values())


class _Held:
    """A saved tensor as autograd keeps it; when autograd lets it go, it leaves the live count."""

    __slots__ = ("tensor", "key", "live")

    def __init__(self, tensor, key: int, live: dict):
        self.tensor, self.key, self.live = tensor, key, live

    def __del__(self):
        entry = self.live.get(self.key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                del self.live[self.key]


def _unpack(held):
    return held.tensor if isinstance(held, _Held) else held


def layer_saved_bytes(model, batch: dict) -> int:
    """The bytes one decoder layer (the first) saves for backward, in a forward without
    checkpointing: what a checkpointed run recomputes, one layer at a time, during backward."""
    import torch

    layer = decoder_layers(model)[0]
    counter = SavedTensors(model)
    before = layer.register_forward_pre_hook(lambda module, args: None if counter.__enter__() else None)
    after = layer.register_forward_hook(lambda module, args, out: counter.__exit__(None, None, None))
    checkpointed = _checkpointing_off(model)
    try:
        with torch.enable_grad():
            model(**batch, use_cache=False)
    finally:
        before.remove()
        after.remove()
        if checkpointed:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return counter.total


def _checkpointing_off(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "is_gradient_checkpointing", False):
        base.gradient_checkpointing_disable()
        return True
    return False


def decoder_layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


@dataclass
class Measured:
    """Bytes, by the plan's part names (parts a machine does not have are absent)."""

    parts: dict[str, int] = field(default_factory=dict)
    peak: int | None = None
    """The highest allocation of one training step above what was held before it (the profiler's)."""


def parameter_parts(model) -> dict[str, int]:
    """``weights`` (frozen parameters and buffers; 4-bit ones at their packed size), ``quant_constants``
    (bitsandbytes' absmax, its double-quant state and code books) and ``trainable``."""
    import torch

    weights = trainable = constants = 0
    seen: set[int] = set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = tensor.untyped_storage().data_ptr()
        if key in seen:  # tied embeddings and lm_head: one storage
            continue
        seen.add(key)
        size = tensor.untyped_storage().nbytes()
        if tensor.requires_grad:
            trainable += size
        else:
            weights += size
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            constants += _quant_state_bytes(state, torch)
    return {"weights": weights, "quant_constants": constants, "trainable": trainable}


def _quant_state_bytes(state, torch) -> int:
    total = 0
    for name in ("absmax", "code"):
        value = getattr(state, name, None)
        if isinstance(value, torch.Tensor):
            total += value.untyped_storage().nbytes()
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += _quant_state_bytes(nested, torch)
    offset = getattr(state, "offset", None)
    if isinstance(offset, torch.Tensor):
        total += offset.untyped_storage().nbytes()
    return total


def gradient_bytes(model) -> int:
    return sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None)


def optimizer_bytes(optimizer) -> int:
    import torch

    seen: set[int] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.numel() > 1:  # the step counter is a scalar
                key = value.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += value.untyped_storage().nbytes()
    return total


def profiled_peak(step) -> int:
    """The highest CPU memory allocated while ``step()`` runs, above what was allocated when it began:
    every allocation and free PyTorch's profiler records, summed in the order they happened."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    sizes = []
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            sizes.append((node.start_time_ns, node.extra_fields.alloc_size))
        pending.extend(node.children)
    level = peak = 0
    for _, size in sorted(sizes):
        level += size
        peak = max(peak, level)
    return peak


def saved_by_kind(model, batch: dict, vocab: int) -> tuple[int, int]:
    """``(activations, logits)``: what one forward of ``batch`` saves for backward, with the tensors
    whose last dimension is the vocabulary (the loss's) apart from the rest."""
    import torch

    counter = SavedTensors(model)
    shapes: dict[int, int] = {}
    pack = counter._pack

    def classify(tensor):
        held = pack(tensor)
        if isinstance(held, _Held):
            shapes[held.key] = tensor.shape[-1] if tensor.dim() else 0
        return held

    counter._pack = classify
    with torch.enable_grad(), counter:
        out = model(**batch, use_cache=False)
        live = {key: size for key, (size, _) in counter._live.items()}
    del out
    logits = sum(size for key, size in live.items() if shapes.get(key) == vocab)
    return sum(live.values()) - logits, logits


def logits_peak(model, rows: int, seq: int) -> int:
    """The highest allocation of the lm_head and the loss over one micro-batch, forward and
    backward, from a hidden state of the right shape (what the plan's ``logits`` part is)."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    vocab = head.weight.shape[0]
    hidden = torch.randn(rows, seq, head.weight.shape[1], dtype=head.weight.dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (rows, seq))

    def step():
        loss = base.loss_function(logits=head(hidden), labels=labels, vocab_size=vocab)
        loss.backward()

    trained = head.weight.requires_grad
    head.weight.requires_grad_(False)  # its gradient (full fine-tuning) is the plan's gradients part
    try:
        return profiled_peak(step) - hidden.numel() * hidden.element_size()  # less the hidden state's gradient
    finally:
        head.weight.requires_grad_(trained)
