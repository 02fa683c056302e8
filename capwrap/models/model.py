"""`CapModel`: one interface over HookedTransformer (TL 3.x) and TransformerBridge (TL 3.x/4.x).

This is the only place that knows which TransformerLens is installed. Analyzers, the training
loop and the recorder talk to a :class:`CapModel` and never branch on the backend: hook names
are TransformerLens's on both (``blocks.0.hook_resid_post``, ``blocks.0.attn.hook_z`` ...) and
weights are read through canonical views (:mod:`capwrap.models.layouts`).

Examples:
    >>> import torch
    >>> from capwrap.models import ModelSpec, build_model
    >>> model = build_model(ModelSpec(d_vocab=20, n_ctx=16, n_layers=2, d_model=32, n_heads=4), seed=0)
    >>> tokens = torch.randint(0, 20, (3, 10))
    >>> model(tokens).shape
    torch.Size([3, 10, 20])
    >>> acts = model.capture(tokens, ["blocks.*.hook_resid_post"])
    >>> sorted(acts), acts["blocks.1.hook_resid_post"].shape
    (['blocks.0.hook_resid_post', 'blocks.1.hook_resid_post'], torch.Size([3, 10, 32]))
"""

from __future__ import annotations

import copy
import fnmatch
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from capwrap.checks import check_token_ids
from capwrap.errors import ConfigError, HookNameError, closest_matches
from capwrap.models.components import ComponentMap
from capwrap.models.layouts import BRIDGE_SPLITS, canonical_names, canonical_views, checkpoint_shapes
from capwrap.models.spec import ModelSpec

__all__ = ["CapModel", "Backend", "available_backends", "default_backend", "build_model", "tl_version"]

Backend = Literal["hooked", "bridge"]
HookFn = Callable[[Tensor, Any], Tensor | None]


#: Bytes one pass of a loop over many sequences may hold at once (see :meth:`CapModel.rows_per_pass`):
#: 256 MiB — the logits of about 50 sequences of 41 tokens over a 32,000-token vocabulary, and no
#: limit worth the name for the small vocabularies of procedural tasks.
PASS_BUDGET = 256 * 2**20


@functools.cache
def tl_version() -> tuple[int, int]:
    """The installed TransformerLens version as ``(major, minor)``."""
    from importlib.metadata import version

    major, minor = version("transformer-lens").split(".")[:2]
    return int(major), int(minor)


def available_backends() -> list[Backend]:
    """Backends the installed TransformerLens offers: ``hooked`` needs TL < 4."""
    return ["hooked", "bridge"] if tl_version()[0] < 4 else ["bridge"]


def default_backend(spec: ModelSpec | None = None) -> Backend:
    """``hooked`` on TransformerLens 3.x (its mature backend), ``bridge`` on 4.x; for a ``spec`` that
    only the bridge can run (an architecture or detail capwrap's features do not describe, kept in
    ``spec.hf_config``), the bridge on either line."""
    if spec is not None and spec.hf_config:
        return "bridge"
    return available_backends()[0]


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A ``torch.dtype`` from its name (``"bfloat16"``, ``"torch.float16"`` ...); ``None`` stays ``None``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` with its index (``"cuda"`` is the current CUDA device,
    ``cuda:0`` ...), refused with the fix where it does not exist on this machine or is not a CPU or a
    CUDA GPU.

    Examples:
        >>> resolve_device("cpu")
        device(type='cpu')
        >>> resolve_device("gpu")
        Traceback (most recent call last):
        ...
        capwrap.errors.ConfigError: unknown device 'gpu': use 'cpu', 'cuda' or 'cuda:N'
        >>> resolve_device("meta")
        Traceback (most recent call last):
        ...
        capwrap.errors.ConfigError: device 'meta': capwrap runs on 'cpu' and CUDA GPUs ('cuda', 'cuda:N'), not on 'meta' devices
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from exc
    if resolved.type == "cpu":
        return torch.device("cpu")
    if resolved.type != "cuda":
        raise ConfigError(f"device {str(device)!r}: capwrap runs on 'cpu' and CUDA GPUs ('cuda', 'cuda:N'), "
                          f"not on {resolved.type!r} devices")  # fmt: skip
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {str(device)!r}: this machine has no CUDA GPU that torch {torch.__version__} can use; "
            "use device 'cpu' (or install a CUDA build of torch on a machine with a GPU)"
        )
    count = torch.cuda.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise ConfigError(f"device {str(device)!r} does not exist: this machine has {count} CUDA device(s), "
                          f"cuda:0 to cuda:{count - 1}")  # fmt: skip
    return torch.device("cuda", torch.cuda.current_device() if resolved.index is None else resolved.index)


@contextmanager
@torch.no_grad()
def keeping_views(tensors: Iterable[Tensor], device: str | torch.device | None = None) -> Iterator[None]:
    """Keep tensors that share memory sharing it across a move between devices inside the block.

    ``nn.Module.to`` moves each parameter on its own, so parameters that were views of one
    another (the TransformerBridge's query/key/value of GPT-2 are views of its fused ``c_attn``)
    come out as independent copies, and tensors that view a parameter without being one (a tied
    unembedding seen as ``W_E.T``) stay behind: a change to one (training, a residency's restore, an
    analyzer's edit) would no longer reach the others. Afterwards, every group of ``tensors`` that
    shared a storage before shares one new storage on ``device`` (default: where the group's first
    tensor went), each tensor at its old offset, shape and stride.

    Raises:
        ConfigError: a tensor of a group came out of the block in another dtype (this keeps views
            across moves, not conversions).

    Examples:
        >>> import torch
        >>> fused = torch.nn.Parameter(torch.arange(6.0))
        >>> half = torch.nn.Parameter(fused.detach()[3:])  # a parameter that views another's memory
        >>> module = torch.nn.ParameterList([fused, half])
        >>> with keeping_views(module.parameters()):
        ...     _ = module.double().float()  # converted parameter by parameter, as a move between devices
        >>> with torch.no_grad():
        ...     _ = fused.add_(1.0)
        >>> half.tolist()
        [4.0, 5.0, 6.0]
    """
    groups: dict[int, dict[int, tuple[Tensor, int, torch.Size, tuple[int, ...], torch.dtype]]] = {}
    for t in tensors:
        storage = t.untyped_storage()
        if storage.nbytes():
            groups.setdefault(storage.data_ptr(), {})[id(t)] = (t, t.storage_offset(), t.shape, t.stride(), t.dtype)
    shared = [(list(group.values()), next(iter(group.values()))[0].untyped_storage().nbytes())
              for group in groups.values() if len(group) > 1]  # fmt: skip
    yield
    for members, nbytes in shared:
        target = torch.device(device) if device is not None else members[0][0].device
        if any(t.dtype != dtype for t, *_, dtype in members):
            raise ConfigError("keeping_views keeps shared memory shared across a move between devices; "
                              "a tensor changed dtype inside the block")  # fmt: skip
        ptrs = {t.untyped_storage().data_ptr() for t, *_ in members}
        if len(ptrs) == 1 and all(t.device == target for t, *_ in members):
            continue  # still one storage: the block moved nothing, or moved the storage as a whole
        new = torch.UntypedStorage(nbytes, device=target)
        for t, offset, shape, stride, dtype in members:
            torch.empty(0, dtype=dtype, device=target).set_(new, offset, shape, stride).copy_(t)
        for t, offset, shape, stride, _ in members:
            t.set_(new, offset, shape, stride)


def resolve_backend(backend: str | None, spec: ModelSpec | None = None) -> Backend:
    """The backend to build ``spec``'s model on (default: :func:`default_backend`), or a clear error."""
    backend = backend or default_backend(spec)
    if backend not in ("hooked", "bridge"):
        raise ConfigError(f"unknown backend {backend!r}; choose 'hooked' or 'bridge'")
    if backend not in available_backends():
        raise ConfigError(
            f"backend 'hooked' needs HookedTransformer, which TransformerLens "
            f"{'.'.join(map(str, tl_version()))} removed; use backend='bridge' or install "
            "'transformer-lens>=3.9,<4'"
        )
    return backend  # type: ignore[return-value]


def _hooked_name(spec: ModelSpec, name: str) -> str:
    """A canonical weight's name on HookedTransformer: grouped K/V weights are ``_W_K``/``_W_V``, and
    the norms of a post-norm-only block (OLMo-2) are its ``ln1``/``ln2``."""
    head, _, leaf = name.rpartition(".")
    if spec.n_key_value_heads != spec.n_heads and leaf in ("W_K", "W_V", "b_K", "b_V"):
        return f"{head}._{leaf}"
    if spec.features.post_norm and not spec.features.pre_norm:  # type: ignore[union-attr]
        return name.replace(".ln1_post.", ".ln1.").replace(".ln2_post.", ".ln2.")
    return name


class CapModel:
    """A TransformerLens model with a backend-independent interface.

    Do not construct directly: use :func:`build_model` or :func:`capwrap.load_model`.

    Attributes:
        spec: the architecture and shape.
        backend: ``"hooked"`` (HookedTransformer) or ``"bridge"`` (TransformerBridge).
        module: the underlying TransformerLens module, for anything capwrap does not wrap.
        tokenizer: the Hugging Face tokenizer, when the checkpoint has one.
        metadata: free-form information saved with the checkpoint (task, training run ...).
    """

    copyable: ClassVar[bool] = True
    """Whether analyzers may work on a copy (:meth:`clone`) of the model; a model accelerate spread
    over devices is not copied (the copy would need all of it in one place)."""

    def __init__(
        self,
        spec: ModelSpec,
        backend: Backend,
        module: nn.Module,
        storage: dict[str, Tensor],
        layout: str,
        tokenizer: Any = None,
        metadata: dict[str, Any] | None = None,
    ):
        self.spec = spec
        self.backend = backend
        self.module = module
        self._storage = storage
        self._layout = layout  # how _storage is named: "hooked" (canonical), "checkpoint", "native" or "split"
        self.tokenizer = tokenizer
        self.metadata = dict(metadata or {})
        self._components: ComponentMap | None = None
        self._residency: Any = None  # a capwrap.models.residency.Residency this model takes turns in
        # Parameters a backend adds that the checkpoint has no room for (TransformerLens 3.9's
        # bridge gives the unembedding a zero bias) stay frozen: training them would change the
        # model in a way that is never saved, and make the backends disagree.
        held = {t.untyped_storage().data_ptr() for t in storage.values()}
        for param in module.parameters():
            if param.untyped_storage().data_ptr() not in held:
                param.requires_grad_(False)

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_state(
        cls,
        spec: ModelSpec,
        state: dict[str, Tensor],
        backend: str | None = None,
        tokenizer: Any = None,
        metadata: dict[str, Any] | None = None,
        dtype: torch.dtype | None = None,
        *,
        compare: bool = True,
    ) -> CapModel:
        """Wrap tensors in the spec's checkpoint layout (as in ``model.safetensors``) in a backend,
        with weights of ``dtype`` (default float32). ``compare``: for a spec capwrap does not compute
        itself (``hf_config``), compare the bridge with ``transformers`` on a few tokens (a copy of a
        model that was compared when it loaded skips it). Building the modules draws from torch's random
        generator; its state is put back (a model loaded, cloned or copied in the middle of a run leaves
        the run's dropout and sampling as they were)."""
        backend = resolve_backend(backend, spec)
        with torch.random.fork_rng(devices=[]):
            if backend == "hooked":
                return cls._hooked_from_state(spec, state, tokenizer, metadata, dtype)
            if spec.has_hf_equivalent:
                return cls._bridge_from_hf_state(spec, state, tokenizer, metadata, dtype, compare)
            return cls._bridge_from_native_state(spec, state, metadata, dtype)

    @classmethod
    def _bridge_from_hf_state(cls, spec, state, tokenizer, metadata, dtype=None, compare=True) -> CapModel:
        hf = _hf_model(spec, state)
        hf.to(dtype=dtype or torch.float32)  # before bridging: the bridge reads some weights through views
        storage = dict(hf.named_parameters())  # before bridging renames the modules
        # a config capwrap does not model runs on TransformerLens's adapter alone: checked against transformers
        check = _ForwardCheck(spec, hf) if spec.hf_config and compare else None
        try:
            bridge = _build_bridge(hf, _bridge_architecture(spec), hf_config=hf.config, tokenizer=tokenizer)
        except (MemoryError, torch.OutOfMemoryError):
            raise  # the machine's limit, not the adapter's
        except Exception as exc:  # noqa: BLE001 - an adapter's own failure, said with what to do
            raise _bridge_error(spec, f"fails to wrap it ({type(exc).__name__}: {exc})") from exc
        if check is not None:
            check(bridge)
        storage, layout = bridge_storage(spec, bridge, storage)
        return cls(spec, "bridge", bridge, storage, layout, tokenizer, metadata)

    @classmethod
    def _bridge_from_native_state(cls, spec, state, metadata, dtype=None) -> CapModel:
        from transformer_lens.model_bridge.sources.native import NativeModel

        config = spec.to_native_config()
        native = NativeModel(config).eval().to(dtype=dtype or torch.float32)
        storage = dict(native.named_parameters())
        with torch.no_grad():
            target = canonical_views(spec, storage, "native")
            for name, value in canonical_views(spec, state).items():
                target[name].copy_(value)
        bridge = _build_bridge(native, "TransformerLensNative", tl_config=config)
        return cls(spec, "bridge", bridge, storage, "native", None, metadata)

    @classmethod
    def _hooked_from_state(cls, spec, state, tokenizer, metadata, dtype=None) -> CapModel:
        import warnings

        from transformer_lens import HookedTransformer

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            module = HookedTransformer(spec.to_hooked_config(), move_to_device=False)
        module.eval().to(dtype or torch.float32, print_details=False)  # TL 3.x's own to(): keeps cfg.dtype
        _adapt_hooked(module, spec)
        if spec.tie_embeddings:
            _tie_unembedding(module)
        params = dict(module.named_parameters())
        if spec.tie_embeddings:
            params["unembed.W_U"] = module.embed.W_E.T  # a view: the one weight, seen both ways
        canonical = {_hooked_name(spec, k): v for k, v in canonical_views(spec, state).items()}
        with torch.no_grad():
            for name, param in params.items():
                if name in canonical:
                    param.copy_(canonical[name])
                else:
                    # Tensors the checkpoint layout has no room for (unembedding bias, the zero
                    # biases of bias-free families) stay at zero and frozen, so both backends
                    # compute the same.
                    param.zero_()
                    param.requires_grad_(False)
        unused = sorted(set(canonical) - set(params))
        if unused:
            raise ConfigError(f"HookedTransformer has no parameters for {unused[:5]}")
        return cls(spec, "hooked", module, params, "hooked", tokenizer, metadata)

    # ---- forward and hooks ------------------------------------------------------------------
    def __call__(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
        return self.forward(tokens)

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits for a batch of token ids (checked; on a GPU, check them on the host: on the device
        the check waits for it)."""
        self._check_tokens(tokens)
        return self._forward_checked(tokens)

    def _forward_checked(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
        # From pageable host memory the ids go without waiting for the device (a blocking copy waits
        # for every kernel queued before it; a non-blocking one from pageable memory is staged at
        # once, so the caller may reuse the tensor). Pinned memory would be read later, when the
        # caller may have refilled it: that copy stays blocking.
        return self.module(tokens.to(self.device, non_blocking=not tokens.is_pinned()))

    def rows_per_pass(self, seq_len: int, backward: bool = False) -> int:
        """How many sequences of ``seq_len`` tokens one pass may take so that what it holds at once
        stays within :data:`PASS_BUDGET` bytes (at least one): what loops over many sequences chunk
        them by, so that a large vocabulary or model does not multiply the memory a pass needs.

        A forward pass holds its float32 logits; with ``backward``, every activation the backward
        pass reads (an estimate per token and block: the residual stream and its norms, queries,
        keys, values and head outputs, the MLP's hidden layer, the attention pattern) and the logits
        three times (their softmax and gradient)."""
        s = self.spec
        per_token = s.d_vocab if not backward else 3 * s.d_vocab + s.n_layers * (
            12 * s.d_model + 4 * s.d_mlp + 2 * s.n_heads * seq_len
        )
        return max(1, PASS_BUDGET // max(1, seq_len * per_token * 4))

    def _check_tokens(self, tokens: Tensor) -> None:
        check_token_ids(tokens, self.spec, "tokens")
        context = self.spec.n_ctx if self.backend == "bridge" else self.module.cfg.n_ctx
        if tokens.shape[1] > context:
            raise ConfigError(
                f"sequence length {tokens.shape[1]} exceeds the model's context n_ctx={context} on HookedTransformer "
                "(backend='bridge' takes the checkpoint's full context); use shorter sequences or backend='bridge'"
            )

    @functools.cached_property
    def hook_names(self) -> list[str]:
        """Every hook point name of the model, sorted."""
        return sorted(self.module.hook_dict)

    def resolve_hooks(self, patterns: str | Iterable[str]) -> list[str]:
        """Hook names matching glob ``patterns`` (``blocks.*.hook_resid_post``), in model order.

        Raises:
            HookNameError: a pattern matches nothing; the message lists the closest names.
        """
        if isinstance(patterns, str):
            patterns = [patterns]
        names: list[str] = []
        for pattern in patterns:
            matched = [n for n in self.hook_names if fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                probe = pattern.replace("*", "0")
                hint = closest_matches(probe, self.hook_names) or closest_matches(pattern, self.hook_names)
                raise HookNameError(
                    f"hook pattern {pattern!r} matches no hook point of this model"
                    + (f"; closest valid names: {hint}" if hint else "")
                    + "; list them with model.hook_names"
                )
            names += [n for n in matched if n not in names]
        return sorted(names, key=_hook_order_key)

    @contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[str, HookFn]]):
        """Context manager that adds forward hooks ``(name, fn(activation, hook))``."""
        with self.module.hooks(fwd_hooks=list(fwd_hooks)):
            yield self

    def capture(
        self,
        tokens: Int[Tensor, "batch pos"],
        patterns: str | Iterable[str],
        batch_size: int | None = None,
        reduce: Callable[[str, Tensor, slice], Tensor] | None = None,
    ) -> dict[str, Float[Tensor, "batch pos ..."]]:
        """Activations at the hooks matching ``patterns``, detached, without gradient.

        Args:
            tokens: token ids.
            patterns: hook names or glob patterns (see :meth:`resolve_hooks`).
            batch_size: run the forward passes this many sequences at a time (bounds memory;
                64 to 128 is also faster on CPU than one large batch). Default: all at once.
            reduce: what to keep of each pass's activation, ``reduce(hook name, activation,
                rows)`` with ``rows`` the slice of ``tokens`` the pass ran; the kept pieces are
                concatenated along their first dimension. Without it, the whole activation. With
                it, what is held is only what is kept: e.g. one position per sequence, or a sum
                per pass, instead of every position of every block for every sequence.

        Examples:
            >>> from capwrap.models import ModelSpec, build_model
            >>> model = build_model(ModelSpec(d_vocab=20, n_ctx=16, n_layers=2, d_model=32, n_heads=4), seed=0)
            >>> tokens = torch.randint(0, 20, (5, 10))
            >>> last = model.capture(tokens, "blocks.*.hook_resid_post", batch_size=2,
            ...                      reduce=lambda name, act, rows: act[:, -1])
            >>> last["blocks.1.hook_resid_post"].shape
            torch.Size([5, 32])
        """
        names = self.resolve_hooks(patterns)
        if batch_size is not None and batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        chunks: list[dict[str, Tensor]] = []

        def saver(store: dict[str, Tensor], name: str, rows: slice) -> HookFn:
            # The bridge reports aliased hooks under their target's name, so key by ours.
            def save(act: Tensor, hook: Any) -> None:
                store[name] = act.detach() if reduce is None else reduce(name, act.detach(), rows)

            return save

        self._check_tokens(tokens)  # once, not once per pass
        step = min(batch_size or max(1, len(tokens)), self.rows_per_pass(tokens.shape[1]))
        for start in range(0, len(tokens), step):
            store: dict[str, Tensor] = {}
            rows = slice(start, min(start + step, len(tokens)))
            with torch.inference_mode(), self.hooks([(n, saver(store, n, rows)) for n in names]):
                self._forward_checked(tokens[rows])
            chunks.append(store)
        if len(chunks) == 1:
            return {n: chunks[0][n] for n in names}
        return {n: torch.cat([c[n] for c in chunks]) for n in names}

    # ---- weights -------------------------------------------------------------------------------
    def _use(self) -> None:
        """Bring the weights into memory if the model takes turns in a Residency."""
        if self._residency is not None:
            self._residency.activate(self)

    def weights(self) -> dict[str, Tensor]:
        """Canonical (TransformerLens-named) views of the weights; writing into them edits the model."""
        self._use()
        if self._layout == "hooked":
            return {k: self._storage[_hooked_name(self.spec, k)] for k in canonical_names(self.spec)}
        return canonical_views(self.spec, self._storage, self._layout)  # type: ignore[arg-type]

    @torch.no_grad()
    def copy_weights_from(self, other: CapModel) -> CapModel:
        """Overwrite every canonical weight with ``other``'s (a model of the same spec); returns self."""
        source = other.weights()
        mine = self.weights()
        torch._foreach_copy_(list(mine.values()), [source[name] for name in mine])  # one fused copy
        return self

    def gradients(self) -> dict[str, Tensor]:
        """Canonical views of the current gradients (zeros where a weight got none): they change with
        the next backward pass or ``zero_grad``, so clone what you keep."""
        self._use()
        if self._layout == "hooked":
            grads = {
                k: (p.grad if p.is_leaf and p.grad is not None else torch.zeros_like(p.detach()))
                for k, p in self._storage.items()
            }
            if self.spec.tie_embeddings:  # one weight: its gradient, seen both ways (as on the bridge)
                grads["unembed.W_U"] = grads["embed.W_E"].T
            return {k: grads[_hooked_name(self.spec, k)] for k in canonical_names(self.spec)}
        return canonical_views(self.spec, self._storage_gradients(), self._layout)  # type: ignore[arg-type]

    def _storage_gradients(self) -> dict[str, Tensor]:
        """Gradients of the storage tensors: their own (a model trained outside the bridge, as a
        wrapped live model is), plus those of views the bridge trains some weights through (GPT-2's
        fused ``c_attn`` through separate q/k/v parameters), scattered back."""
        grads = {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in self._storage.items()}
        # a storage tensor's own gradient is copied before views' gradients are added to it (zeros are fresh)
        copied = {k for k, p in self._storage.items() if p.grad is None}
        held = {id(p) for p in self._storage.values()}
        by_storage = {p.untyped_storage().data_ptr(): k for k, p in self._storage.items()}
        for p in self.module.parameters():
            if p.grad is None or id(p) in held:
                continue
            owner = by_storage.get(p.untyped_storage().data_ptr())
            if owner is None:
                continue
            if owner not in copied:
                grads[owner] = grads[owner].clone()
                copied.add(owner)
            base = self._storage[owner]
            offset = p.storage_offset() - base.storage_offset()
            grads[owner].as_strided(p.shape, p.stride(), offset).add_(p.grad)
        return grads

    def checkpoint_state(self) -> dict[str, Tensor]:
        """Copies of the weights in the checkpoint layout (Hugging Face names for gpt2 and llama,
        canonical names for tracr), ready for ``model.safetensors``."""
        spec = self.spec
        weights = self.weights()
        if spec.tie_embeddings and not torch.equal(weights["unembed.W_U"], weights["embed.W_E"].T):
            raise ConfigError(
                "the unembedding no longer equals the transposed embedding, so this model cannot be "
                "saved with tied embeddings; rebuild it with ModelSpec(tie_embeddings=False)"
            )
        out = {k: torch.zeros(s, dtype=weights["embed.W_E"].dtype) for k, s in checkpoint_shapes(spec).items()}
        with torch.no_grad():
            for name, view in canonical_views(spec, out).items():
                view.copy_(weights[name])
        return out

    @property
    def cannot_train(self) -> str | None:
        """Why the model cannot be trained (a sentence), or ``None`` when it can."""
        return None

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters, for an optimizer."""
        self._use()
        seen, out = set(), []
        for p in self.module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    @property
    def components(self) -> ComponentMap:
        """Which slices of :meth:`weights` are head H of layer L, neuron N of MLP L, ..."""
        if self._components is None:
            self._components = ComponentMap.from_spec(self.spec)
        return self._components

    # ---- misc -------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return next(iter(self._storage.values())).device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype."""
        return next(iter(self._storage.values())).dtype

    def to(self, device: str | torch.device) -> CapModel:
        """Move to ``device`` in place; returns self."""
        target = torch.device(device) if self._residency is not None else resolve_device(device)
        if target != self.device:
            if self._residency is not None:
                raise ConfigError("a model that takes turns in a Residency cannot move; move it before adding it")
            tensors = [*self.module.parameters(), *self.module.buffers(), *self._storage.values()]
            with keeping_views(tensors, target):
                self.module.to(target, print_details=False)  # both TL modules accept print_details
        return self

    def train(self, mode: bool = True) -> CapModel:
        """Training mode (as ``nn.Module.train``); returns self."""
        self.module.train(mode)
        return self

    def eval(self) -> CapModel:
        """Evaluation mode; returns self."""
        return self.train(False)

    def clone(self, backend: str | None = None, dtype: str | torch.dtype | None = None) -> CapModel:
        """An independent copy, optionally on another backend or in another precision (``dtype``:
        e.g. a float32 copy of a bfloat16 model, to train it without losing small updates)."""
        dtype = resolve_dtype(dtype)
        if (backend is None or backend == self.backend) and (dtype is None or dtype == self.dtype):
            return copy.deepcopy(self)
        return CapModel.from_state(
            self.spec, self.checkpoint_state(), backend or self.backend, self.tokenizer, _copied_metadata(self.metadata),
            dtype or self.dtype, compare=False,
        ).to(self.device)

    def __deepcopy__(self, memo: dict) -> CapModel:
        return CapModel.from_state(
            self.spec,
            self.checkpoint_state(),
            self.backend,
            self.tokenizer,
            _copied_metadata(self.metadata, memo),
            self.dtype,
            compare=False,
        ).to(self.device)

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"CapModel({s.architecture}, backend={self.backend}, layers={s.n_layers}, d_model={s.d_model}, "
            f"heads={s.n_heads}, d_mlp={s.d_mlp}, vocab={s.d_vocab}, params={s.n_params:,})"
        )


def _tie_unembedding(module: nn.Module) -> None:
    """Make a HookedTransformer's unembedding read its embedding matrix, so that training keeps the
    two tied as the checkpoint has them (HookedTransformer otherwise holds two separate copies)."""
    unembed, embed = module.unembed, module.embed

    class TiedUnembed(type(unembed)):  # type: ignore[misc, valid-type]
        @property
        def W_U(self) -> Tensor:  # noqa: N802 - TransformerLens's name
            return embed.W_E.T

    del unembed._parameters["W_U"]
    unembed.__class__ = TiedUnembed


def _adapt_hooked(module: nn.Module, spec: ModelSpec) -> None:
    """Give a HookedTransformer what its config has no flag for, so that it computes what the
    checkpoint's weights mean: RMSNorm by ``offset + w`` (Gemma stores ``w``; TransformerLens's own
    Gemma loader adds the offset into the weights, which would break writing them back) and token
    embeddings scaled by ``sqrt(d_model)``."""
    features = spec.features
    assert features is not None
    if features.norm_offset:
        offset = features.norm_offset
        for norm in [m for m in module.modules() if type(m).__name__ == "RMSNorm"]:

            class OffsetRMSNorm(type(norm)):  # type: ignore[misc, valid-type]
                def forward(self, x: Tensor) -> Tensor:  # TransformerLens's RMSNorm, scaled by offset + w
                    scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
                    return self.hook_normalized(x / scale) * (offset + self.w)

            norm.__class__ = OffsetRMSNorm
    if features.embed_scale:
        scale = spec.d_model**0.5

        class ScaledEmbed(type(module.embed)):  # type: ignore[misc, valid-type]
            def forward(self, tokens: Tensor) -> Tensor:
                out = super().forward(tokens)
                return out * torch.tensor(scale, dtype=out.dtype)

        module.embed.__class__ = ScaledEmbed


#: ``metadata`` key of an in-memory copy (:meth:`CapModel.clone`): the source of the model it copies,
#: which its own ``source`` keeps naming (a LoRA adapter trained on the copy names that base), while
#: provenance says the copy was made in memory.
COPY_OF = "copy_of"
#: The metadata keys that say where a model's weights come from (the rest is free-form: what its
#: maker wrote about it): ``vocabulary`` (the token rows a load left out, :mod:`capwrap.models.vocabulary`)
#: and ``tokenizer_source`` (the folder of a tokenizer read from elsewhere than ``source``) included.
PROVENANCE_KEYS = ("source", "revision", COPY_OF, "adapter", "vocabulary", "tokenizer_source")


def _copied_metadata(metadata: dict[str, Any], memo: dict | None = None) -> dict[str, Any]:
    out = copy.deepcopy(metadata, memo)
    if out.get("source") is not None:
        out[COPY_OF] = out["source"]
    return out


def _split_copies(spec: ModelSpec, bridge: nn.Module, storage: dict[str, Tensor]) -> dict[str, Tensor]:
    """The bridge's own parameters where it split a fused projection into copies
    (:data:`~capwrap.models.layouts.BRIDGE_SPLITS`: TransformerLens does for GPT-NeoX's per-head
    ``query_key_value``, which no view can split, and for any fused projection accelerate
    offloaded), by name (``gpt_neox.layers.0.attention.q.weight``): every layer's parts, the views
    among them too, as soon as one layer's are copies; empty where it split into views or not at all."""
    if spec.family is None:
        return {}
    held = {t.untyped_storage().data_ptr() for t in storage.values()}
    params = {name.replace("._original_component", ""): p for name, p in bridge.named_parameters()}
    out: dict[str, Tensor] = {}
    for split in BRIDGE_SPLITS:
        if getattr(spec.family.tensors, split.fused) is None:
            continue
        wanted = [n for layer in range(spec.n_layers) for n in split.names(spec, split.parts, layer)]
        parts = {n: params[n] for n in wanted if n in params}
        if any(p.untyped_storage().data_ptr() not in held for p in parts.values()):
            out |= parts
    return out


def bridge_storage(spec: ModelSpec, bridge: nn.Module, storage: dict[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """The tensors the bridge computes with, and their layout: ``storage`` (checkpoint names) as it
    is, or, where the bridge split a fused projection into copies (:func:`_split_copies`), with
    those copies in place of the fused tensors (layout ``"split"``)."""
    split = _split_copies(spec, bridge, storage)
    if not split:
        return storage, "checkpoint"
    fused: set[str] = set()
    for projection in BRIDGE_SPLITS:
        if projection.was_split(spec, split):
            name = getattr(spec.family.tensors, projection.fused)  # type: ignore[union-attr]
            fused |= {n for layer in range(spec.n_layers) for n in projection.names(spec, (name,), layer)}
    return {k: v for k, v in storage.items() if k not in fused} | split, "split"


def _hf_model(spec: ModelSpec, state: dict[str, Tensor] | None = None) -> nn.Module:
    """The ``transformers`` model of a spec in float32 with eager attention (so hooks see attention
    patterns): randomly initialized (Hugging Face's initialization), or holding ``state`` — loaded
    as ``transformers`` loads checkpoints (``from_pretrained``: no random initialization first, older
    tensor names renamed, embeddings tied), with a clear error if the tensors do not fit."""
    import transformers

    config = spec.to_hf_config()
    dtype = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32}
    if state is None:
        return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", **dtype)
    model_class = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # its load report: what does not fit is said below
    try:
        hf, info = model_class.from_pretrained(
            None, config=config, state_dict=state, attn_implementation="eager", output_loading_info=True, **dtype
        )
    except RuntimeError as exc:  # transformers 5 raises on tensors of other shapes, its report logged apart
        if "mismatched_sizes" not in str(exc) and "size mismatch" not in str(exc):
            raise
        with torch.device("meta"):  # shapes only
            expected = dict(model_class(config).state_dict())
        other = [f"{k} {list(v.shape)} (the config gives {list(expected[k].shape)})"
                 for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]  # fmt: skip
        raise ConfigError(
            f"the weights do not fit the {spec.architecture} model its config.json describes: tensors of another "
            f"shape{' ' + ', '.join(other[:3]) if other else ''}; was config.json edited, or saved with other weights?"
        ) from exc
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    missing = [m for m in info["missing_keys"] if not (spec.tie_embeddings and m == "lm_head.weight")]
    unexpected, mismatched = info["unexpected_keys"], info.get("mismatched_keys", [])
    if missing or unexpected or mismatched:
        raise ConfigError(
            f"the weights do not fit a {spec.architecture} model of this shape: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
            + (f", of another shape {list(mismatched)[:5]}" if mismatched else "")
        )
    return hf.eval()


def _bridge_architecture(spec: ModelSpec) -> str:
    """The TransformerBridge adapter's key for a spec."""
    if not spec.hf_config:
        return spec.hf_class
    from capwrap.models.configs import bridge_architecture

    name = bridge_architecture(spec.to_hf_config())
    if name is None:
        raise ConfigError(
            f"the installed TransformerLens bridge has no adapter for {spec.hf_class or spec.architecture}; "
            "upgrade transformer-lens, or use a checkpoint of a family capwrap knows"
        )
    return name


def _bridge_error(spec: ModelSpec, what: str) -> ConfigError:
    """TransformerLens's adapter cannot run a checkpoint capwrap does not model itself: why, and what to do."""
    import transformers

    versions = f"TransformerLens {'.'.join(map(str, tl_version()))} with transformers {transformers.__version__}"
    return ConfigError(
        f"{versions}: its {_bridge_architecture(spec)} adapter {what}, so capwrap cannot analyze this "
        f"{spec.architecture} checkpoint, whose configuration capwrap does not compute itself "
        f"({'; '.join(spec.unsupported) or 'no capwrap family'}); the other TransformerLens line "
        "(3.9 or 4.x) may run it"
    )


class _ForwardCheck:
    """The logits ``transformers`` computes for a few tokens, kept before bridging, to compare with the
    bridge's: an adapter that computes another model (TransformerLens 3.9's Cohere: 0.08 to 0.19 off where
    logits reach about 0.25) or fails on its first pass (CodeGen under transformers 5) is refused at load."""

    #: Of the largest logit, by the weights' dtype: reordered float32 sums stay near 1e-6.
    TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}

    def __init__(self, spec: ModelSpec, hf: nn.Module):
        self.spec = spec
        self.tolerance = self.TOLERANCE.get(next(hf.parameters()).dtype, 5e-2)
        n = max(1, min(8, spec.n_ctx))
        self.tokens = (torch.arange(n) * 7 + 3).remainder(spec.d_vocab)[None]
        with torch.no_grad():
            self.expected = hf(self.tokens).logits.float()

    def __call__(self, bridge: nn.Module) -> None:
        try:
            with torch.no_grad():
                logits = bridge(self.tokens).float()
        except (MemoryError, torch.OutOfMemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - an adapter's own failure, said with what to do
            raise _bridge_error(self.spec, f"fails on its first forward pass ({type(exc).__name__}: {exc})") from exc
        off = float((logits - self.expected).abs().max())
        scale = float(self.expected.abs().max()) or 1.0
        if not off <= self.tolerance * max(scale, 1.0):
            raise _bridge_error(
                self.spec, f"computes other logits than transformers does (up to {off:.3g} apart where they reach {scale:.3g})"
            )


def _build_bridge(module: nn.Module, architecture: str, **config: Any) -> nn.Module:
    """Wrap an in-memory model in a TransformerBridge (no hub access), through TransformerLens's
    public builder (``transformer_lens.model_bridge.sources``, in 3.9 and 4.x)."""
    try:
        from transformer_lens.model_bridge.sources import build_bridge_from_module
    except ImportError as exc:  # pragma: no cover - depends on the TL release
        raise ConfigError(
            "this TransformerLens release has no TransformerBridge builder for in-memory models; "
            "install transformer-lens 3.9.x or 4.x"
        ) from exc
    return build_bridge_from_module(module, architecture, **config)


def _hook_order_key(name: str) -> tuple:
    parts = name.split(".")
    if parts[0] == "blocks":
        return (1, int(parts[1]), name)
    return (0 if "embed" in name and "unembed" not in name else 2, 0, name)


def build_model(spec: ModelSpec, backend: str | None = None, seed: int = 0) -> CapModel:
    """A randomly initialized model (Hugging Face's initialization), reproducible from ``seed``.

    The same ``seed`` gives the same weights on every backend.
    """
    if spec.compiled:
        raise ConfigError(f"{spec.architecture} models are compiled, not built: see capwrap.tasks.tracr")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = _hf_model(spec)
    return CapModel.from_state(spec, dict(hf.state_dict()), backend)
