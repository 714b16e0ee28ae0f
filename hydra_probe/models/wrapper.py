"""The package's model wrapper and loaders."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ArchitectureError, InputError, OptionError
from .adapter import Adapter

BACKENDS = ("local", "nnsight")


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """Parse ``device`` and check that it exists here; ``None`` stays ``None``."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise OptionError(f"device {device!r} is not a torch device; use e.g. 'cpu', 'cuda:0' or 'mps'.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"device {device!r} was asked for but CUDA is not available here; use 'cpu'.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise OptionError(f"device {device!r} does not exist: {n} CUDA device(s) here; use one of "
                              f"cuda:0..cuda:{n - 1}, or 'cpu'.")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise OptionError(f"device {device!r} was asked for but MPS is not available here; use 'cpu'.")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise OptionError(f"device {device!r} is not supported; use 'cpu', 'cuda[:i]' or 'mps'.")
    return dev


class HookedModel:
    """A causal LM with its tokenizer, as hydra_probe sees it.

    Attributes:
        hf_model: the underlying ``transformers`` module (never modified).
        tokenizer: its tokenizer.
        adapter: the architecture adapter (module paths live there).
        name: model id recorded in every result's provenance.
        n_layers, n_heads, n_kv_heads, head_dim, d_model: shapes.
        backend: ``"local"`` (fast hooks, prefix reuse) or ``"nnsight"``
            (one nnsight trace per run; ``remote=True`` goes to NDIF).
    """

    #: :meth:`evaluating` runs GPT-2's ``gelu_new`` as PyTorch's fused tanh GELU (same function; False: the
    #: model's own formula, the plain reference)
    fast_activations: bool = True
    _fast_on: bool = False  # a swap of an outer evaluating() block is active

    def __init__(
        self,
        hf_model: nn.Module,
        tokenizer: Any,
        *,
        name: str | None = None,
        backend: str = "local",
        nnsight_model: Any = None,
        remote: bool | str = False,
    ) -> None:
        if backend not in BACKENDS:
            raise OptionError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
        remote = check_remote(remote, backend)
        if tokenizer is None:
            raise InputError(
                "a tokenizer is needed: pass tokenizer=AutoTokenizer.from_pretrained(...) "
                "with a transformers model object."
            )
        if getattr(getattr(hf_model, "config", None), "is_encoder_decoder", False):
            raise ArchitectureError(f"{type(hf_model).__name__} is an encoder-decoder model; hydra_probe needs a "
                                    "decoder-only causal LM (load it with AutoModelForCausalLM).")
        _check_causal(hf_model)
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.adapter = Adapter(hf_model)
        self.name = public_name(name or str(getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__))
        self.backend = backend
        #: False (run here), True (nnsight's configured NDIF host), a host URL, or "local" (nnsight's simulation)
        self.remote = remote
        self.adapter.remote = bool(remote)
        if remote and remote != "local" and any(p.device.type == "meta" for p in hf_model.parameters()):
            raise OptionError("remote runs need the model's weights here too (the metric's unembedding and the "
                              "readout are computed locally); load the weights (not on the meta device).")
        self._nnsight = nnsight_model

    # shapes -------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    @property
    def n_heads(self) -> int:
        return self.adapter.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.adapter.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.adapter.head_dim

    @property
    def d_model(self) -> int:
        return self.adapter.d_model

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    @property
    def parallel_residual(self) -> bool:
        return self.adapter.parallel

    @property
    def family(self) -> str:
        return self.adapter.table.family

    def components(self, selector: Any = "all") -> list:
        """Components for ``selector`` ("all", "heads", "mlps", "layers", names, ...)."""
        from ..components import select

        return select(self, selector)

    @property
    def nnsight(self) -> Any:
        """An nnsight ``LanguageModel`` around :attr:`hf_model` (made on first use)."""
        if self._nnsight is None:
            import warnings

            import nnsight

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._nnsight = nnsight.LanguageModel(self.hf_model, tokenizer=self.tokenizer)
        return self._nnsight

    @property
    def closure_rtol(self) -> float:
        """The stated relative tolerance of decompositions in this model's dtype: ``eps(dtype) * (8 + n_layers)``.

        Activations are read in the model's dtype and summed in float64; the
        model's own residual stream and logits round at every add and norm,
        so direct effects plus the constant match the model's metric within
        ``closure_rtol * (sum_c |DE_c| + |const|)`` per prompt (about 1.3e-6
        for float32, 0.009 for float16 and 0.07 for bfloat16 in a 64-layer
        model). A bound observed to hold with a margin of 3 or more on every
        supported family, not a proof.
        """
        return float(torch.finfo(self.adapter.dtype).eps) * (8 + self.n_layers)

    def token_budget(self, fraction: float = 0.5) -> int:
        """Tokens per stacked forward (copies x prompts x positions) that fit the device's free memory.

        On a CUDA device: ``fraction`` of the free memory (``torch.cuda.mem_get_info``) over an estimate
        of the bytes one token holds during a forward without gradients (a few residual-width and
        MLP-width activations plus its row of attention scores), clamped to 1024..262144. Elsewhere
        (CPU, MPS, remote, several devices) the fixed 8192. A run that still runs out of memory halves it.
        """
        devs = {p.device for p in self.hf_model.parameters() if p.device.type != "meta"}
        if self.remote or len(devs) != 1 or next(iter(devs)).type != "cuda" or not torch.cuda.is_available():
            return 8192
        free, _ = torch.cuda.mem_get_info(next(iter(devs)))
        return budget_for_memory(self, free, fraction)

    def require_local(self, analysis: str) -> None:
        """Raise :class:`~hydra_probe.errors.OptionError` at once when ``analysis`` cannot run on this remote model."""
        if self.remote:
            raise OptionError(
                f"{analysis} runs local hooks (a remote server ignores them), so it cannot run with remote=True yet; "
                "run it on a local model (remote=False); the package's own analyses run remotely as nnsight traces.")

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Put every module in eval mode for the block, restoring each flag after. With
        ``HookedModel.fast_activations`` (default True), transformers' ``NewGELUActivation`` (GPT-2's
        ``gelu_new``, a Python formula of five tensor operations) computes the same function as PyTorch's
        fused ``gelu(x, approximate="tanh")`` for the block (equal to float rounding; about a fifth of a
        GPT-2 sweep's CPU time was that formula). On the local backend this holds also where another library
        has set the module's instance ``forward`` (nnsight's ``LanguageModel`` wraps every module of the model
        it is given, the same model object a user may also pass here): that ``forward`` is put back after the
        block. The nnsight backend keeps it (its traces reach modules through it)."""
        mods = list(self.hf_model.modules())
        flags = [(m, m.training) for m in mods]
        swapped: list[tuple[nn.Module, Any]] = []
        if self.fast_activations and not self._fast_on:
            for m in mods:
                own = m.__dict__.get("forward", _UNSET)
                if type(m).__name__ == "NewGELUActivation" and own is not _gelu_tanh \
                        and (own is _UNSET or self.backend == "local"):
                    swapped.append((m, own))
        try:
            self.hf_model.eval()
            for m, _ in swapped:
                m.forward = _gelu_tanh
            self._fast_on = self._fast_on or bool(swapped)
            yield
        finally:
            for m, own in swapped:
                if own is _UNSET:
                    del m.forward
                else:
                    m.forward = own
            if swapped:
                self._fast_on = False
            for m, f in flags:
                m.training = f

    def __repr__(self) -> str:
        return (f"HookedModel({self.name!r}, family={self.family}, layers={self.n_layers}, "
                f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, d_model={self.d_model}, backend={self.backend!r})")


_UNSET = object()  # no instance ``forward`` was set


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``: transformers' ``NewGELUActivation``, fused; where a
    gradient is taken, through :class:`_GeluTanhSlope`."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _GeluTanhSlope.apply(x)
    return torch.nn.functional.gelu(x, approximate="tanh")


class _GeluTanhSlope(torch.autograd.Function):
    """``gelu(x, approximate="tanh")`` whose backward multiplies by its slope, formed once in the forward
    (PyTorch's own ``gelu_backward`` of a unit gradient): a graph kept for several backward passes (AtP*'s
    GradDrop runs one per dropped layer on one forward, up to 78 per GPT-2-small block stack) pays the tanh
    once instead of once per pass; the same numbers to float rounding. First derivatives only (no
    ``create_graph``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        one = torch.ones((), dtype=x.dtype, device=x.device).expand_as(x)
        ctx.save_for_backward(torch.ops.aten.gelu_backward(one, x, approximate="tanh"))
        return torch.nn.functional.gelu(x, approximate="tanh")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        slope, = ctx.saved_tensors
        return grad * slope


def budget_for_memory(model: HookedModel, free_bytes: int, fraction: float = 0.5) -> int:
    """Tokens per stacked forward that fit in ``fraction`` of ``free_bytes`` (see ``HookedModel.token_budget``)."""
    cfg = model.hf_model.config
    d_mlp = int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * model.d_model)
    ctx = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 1024)
    elem = torch.finfo(model.adapter.dtype).bits // 8
    per_token = elem * (8 * model.d_model + 2 * d_mlp + 2 * model.n_heads * min(ctx, 512))
    return int(min(262144, max(1024, fraction * free_bytes // per_token)))


def check_remote(remote: Any, backend: str) -> bool | str:
    """Validate a ``remote`` setting before any work: False, True, ``"local"`` or an http(s) host URL.

    ``True`` sends to nnsight's configured host (``NDIF_HOST`` / ``nnsight.CONFIG.API.HOST``), which must be a URL.
    """
    if remote is None or remote is False:
        return False
    if not (remote is True or isinstance(remote, str)):
        raise OptionError(f"remote must be True, False, 'local' or an NDIF host URL, not {remote!r}.")
    if backend != "nnsight":
        raise OptionError("remote execution runs through nnsight; pass backend='nnsight' too "
                          "(load_model(..., backend='nnsight', remote=True)).")
    if remote != "local":
        from .nnsight_backend import remote_host

        host = remote_host(remote)
        if isinstance(remote, str):
            return host  # the URL as nnsight will use it (no trailing slash)
    return remote


def _class_names(mapping: dict[str, Any]) -> set[str]:
    out: set[str] = set()
    for v in mapping.values():
        out.update(v if isinstance(v, (tuple, list)) else (v,))
    return out


def _check_causal(hf_model: nn.Module) -> None:
    """Refuse transformers models known not to be causal LMs (base models, masked LMs, classifiers)."""
    try:
        from transformers.models.auto import modeling_auto as ma
    except ImportError:  # pragma: no cover
        return
    mro = {c.__name__ for c in type(hf_model).__mro__}
    causal = _class_names(ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if mro & causal or any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in mro):
        return
    other = set()
    for name in ("MODEL_MAPPING_NAMES", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "MODEL_FOR_PRETRAINING_MAPPING_NAMES",
                 "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
                 "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES"):
        other |= _class_names(getattr(ma, name, {}))
    if mro & other:
        from .tables import supported_model_types

        raise ArchitectureError(
            f"{type(hf_model).__name__} is not a causal LM (it is a base model, masked LM or classifier); "
            "hydra_probe needs a decoder-only causal LM with its next-token head, e.g. GPT2LMHeadModel or "
            "LlamaForCausalLM (AutoModelForCausalLM.from_pretrained(...)), of a supported model type: "
            f"{', '.join(supported_model_types())} (others: hydra_probe.models.register_table)."
        )


def _is_nnsight(x: Any) -> bool:
    return type(x).__module__.startswith("nnsight")


def load_model(
    x: Any,
    tokenizer: Any = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    backend: str = "local",
    remote: bool | str = False,
    trust_remote_code: bool = False,
    device_map: str | dict[str, Any] | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> HookedModel:
    """Wrap a model for hydra_probe.

    ``x`` is an nnsight ``LanguageModel`` or ``TransformersModel``, a transformers causal LM (then
    ``tokenizer`` is required), a hub name or local folder (safetensors
    weights only), a ``.gguf`` file (dequantized by transformers; needs the
    ``gguf`` extra, ``pip install 'hydra-probe[gguf]'``; the tokenizer is read
    from the file unless given), or ``"default"`` for the shipped model.
    A Gemma-3 vision-language checkpoint (name or folder) is analysed through
    its text model (the same modules). Results name a local folder or file by
    its own name, never by its path. ``device`` moves a
    loaded model (for a model object it is moved in place, as ``.to`` does).
    ``dtype`` applies to names and folders: None loads in float32 (exact
    decompositions and comparable numbers; transformers 5 would otherwise keep
    a checkpoint's bfloat16), ``"auto"`` keeps the checkpoint's dtype, or give
    a torch dtype. A model object keeps its dtype.

    ``device_map`` (``"auto"``, ``"balanced"``, ``"sequential"`` or a dict
    module -> device, ``"cpu"`` or ``"disk"``) and ``offload_folder`` pass
    through to transformers/accelerate for names and folders: a model too
    large for one device is split over devices, CPU and disk, with the same
    numbers (weights are loaded from the offload when an analysis reads them).
    A model object already dispatched by accelerate works as it is.
    ``backend="nnsight", remote=True`` runs every forward on NDIF (host from
    ``NDIF_HOST`` / ``nnsight.CONFIG.API.HOST``); ``remote="local"`` is
    nnsight's local simulation of it; a URL string names the host.
    """
    dev = resolve_device(device)
    resolve_dtype(dtype)  # a bad dtype fails before anything loads
    check_remote(remote, backend)  # so do a remote setting without nnsight and a host that is not a URL
    placement = check_placement(dev, device_map, offload_folder)
    if isinstance(x, HookedModel):
        return x
    if isinstance(x, (str, os.PathLike)) and str(x) == "default":
        return load_default_model(device=dev, backend=backend, remote=remote, device_map=device_map,
                                  offload_folder=offload_folder)
    nn_model = None
    name = None
    if _is_nnsight(x):
        nn_model = x
        hf = getattr(x, "_module", None)
        tokenizer = tokenizer if tokenizer is not None else getattr(x, "tokenizer", None)
        if hf is None:
            raise InputError("this nnsight object wraps no loaded module; pass a LanguageModel built from a model.")
    elif isinstance(x, nn.Module):
        hf = x
    elif isinstance(x, (str, os.PathLike)) and str(x).lower().endswith(".gguf"):
        hf, tok, name = _from_gguf(str(x), dtype=dtype, need_tokenizer=tokenizer is None)
        tokenizer = tokenizer if tokenizer is not None else tok
    elif isinstance(x, (str, os.PathLike)):
        hf, tok, name = _from_pretrained(str(x), dtype=dtype, trust_remote_code=trust_remote_code, **placement)
        tokenizer = tokenizer if tokenizer is not None else tok
    else:
        raise InputError(
            f"cannot load a model from a {type(x).__name__}; pass an nnsight LanguageModel, a transformers "
            "causal LM with its tokenizer, a hub name or folder, or 'default'."
        )
    if placement and not isinstance(x, (str, os.PathLike)):
        raise OptionError("device_map and offload_folder apply when loading a name or folder; a model object keeps "
                          "its placement (dispatch it with accelerate first, or pass its name).")
    if dev is not None and next(hf.parameters()).device != dev:
        hf.to(dev)
    return HookedModel(hf, tokenizer, name=name, backend=backend, nnsight_model=nn_model, remote=remote)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    """The dtype to load weights in: None -> float32; a name from :data:`DTYPES`; or a torch floating dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise OptionError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)} (or a torch dtype).")
        return DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise OptionError(f"dtype must be a floating torch dtype or one of {', '.join(DTYPES)}, not {dtype!r}.")
    return dtype


def check_placement(device: torch.device | None, device_map: Any, offload_folder: Any) -> dict[str, Any]:
    """Validate ``device_map`` and ``offload_folder`` before loading; the keyword arguments for from_pretrained."""
    out: dict[str, Any] = {}
    if device_map is None:
        if offload_folder is not None:
            raise OptionError("offload_folder needs a device_map (e.g. device_map='auto'); without one nothing is "
                              "offloaded.")
        return out
    if device is not None:
        raise OptionError("give either device (one device) or device_map (split over devices), not both.")
    _require_accelerate()
    if isinstance(device_map, str):
        if device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
            resolve_device(device_map)  # a single device name: it must exist
    elif isinstance(device_map, dict):
        for module, where in device_map.items():
            if where in ("disk", "cpu", "meta") or isinstance(where, int) and not isinstance(where, bool):
                if isinstance(where, int) and where >= torch.cuda.device_count():
                    raise OptionError(f"device_map puts {module!r} on GPU {where}, which does not exist "
                                      f"({torch.cuda.device_count()} CUDA device(s) here).")
                continue
            try:
                resolve_device(where)
            except OptionError as e:
                raise OptionError(f"device_map puts {module!r} on {where!r}: {e}") from None
        if "disk" in device_map.values() and offload_folder is None:
            raise OptionError("device_map puts modules on 'disk'; give offload_folder= (a writable folder) too.")
    else:
        raise OptionError(f"device_map must be 'auto', 'balanced', 'sequential', a device or a dict module -> device, "
                          f"not {type(device_map).__name__}.")
    out["device_map"] = device_map
    if offload_folder is not None:
        out["offload_folder"] = str(_writable_folder(offload_folder))
    return out


def _require_accelerate() -> None:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise OptionError("device_map needs the accelerate package: pip install accelerate.") from None


def _writable_folder(folder: Any) -> Path:
    """Create ``folder`` if needed and check that a file can be written there."""
    p = Path(folder).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".hydra_probe_write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OptionError(f"offload_folder {str(folder)!r} cannot be written ({e.strerror or e}); give a folder "
                          "on a disk with room that you can write to.") from None
    return p


def _from_pretrained(path: str, dtype: torch.dtype | str | None, trust_remote_code: bool, **placement: Any):
    import transformers as tf

    p = Path(path)
    looks_local = p.is_absolute() or path.startswith(("./", "../", "~", ".\\")) or path.count("/") > 1
    if looks_local and not p.expanduser().exists():
        raise InputError(f"model folder {path!r} does not exist; give a folder saved with save_pretrained, "
                         "a hub name such as 'gpt2', or 'default'.")
    if p.exists() and p.is_file():
        raise InputError(f"{path!r} is a file; give the folder that holds config.json and the .safetensors weights.")
    if p.exists() and p.is_dir() and not any(p.glob("*.safetensors")):
        raise InputError(
            f"{path} holds no .safetensors weights; hydra_probe loads safetensors only "
            "(re-save the model with save_pretrained(..., safe_serialization=True))."
        )
    kw: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": trust_remote_code,
                          "dtype": resolve_dtype(dtype), **placement}
    try:
        hf = tf.AutoModelForCausalLM.from_pretrained(path, **kw)
    except ValueError as e:
        if "Unrecognized configuration" in str(e) or "AutoModelForCausalLM" in str(e):
            raise ArchitectureError(f"{path} is not a causal language model ({str(e).splitlines()[0]}).") from None
        raise
    except OSError as e:
        hint = ""
        if not p.exists():
            hint = (" A hub name must be in the local Hugging Face cache when there is no network: download it "
                    "where there is one (e.g. `hf download NAME`) or save it with save_pretrained and pass the folder.")
        raise InputError(f"cannot load model {path!r}: {str(e).splitlines()[0]}{hint}") from None
    hf = text_causal_lm(hf)
    tok = tf.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return hf.eval(), tok, public_name(path)


def load_default_model(device: str | torch.device | None = None, backend: str = "local",
                       remote: bool | str = False, device_map: str | dict[str, Any] | None = None,
                       offload_folder: str | os.PathLike | None = None) -> HookedModel:
    """Load the shipped IOI model (offline) from ``hydra_probe/zoo/default``.

    With ``remote``, a server must serve the same folder (its repo id is the folder's path).
    """
    from ..zoo import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "model.safetensors").exists():
        raise InputError(f"the shipped model is missing from {DEFAULT_MODEL_DIR}; reinstall hydra_probe.")
    m = load_model(str(DEFAULT_MODEL_DIR), device=device, backend=backend, remote=remote, device_map=device_map,
                   offload_folder=offload_folder)
    m.name = "hydra_probe/default-ioi"
    return m


# ---------------------------------------------------------------------------- names, GGUF, vision-language
def public_name(name: str) -> str:
    """The name results record for a model: a hub name as given; a local folder or file by its own name only
    (never a path on the user's machine)."""
    s = str(name)
    p = Path(s).expanduser()
    local = (os.path.isabs(s) or s.startswith(("./", "../", "~", ".\\")) or s.count("/") > 1
             or s.lower().endswith(".gguf") or "\\" in s)
    try:
        local = local or p.exists()
    except OSError:  # pragma: no cover - odd names
        pass
    return (p.name or s) if local else s


def text_causal_lm(hf: nn.Module) -> nn.Module:
    """A vision-language model whose text model has a table (Gemma-3), as that text model's causal LM sharing
    its modules (no copy: the language model and the unembedding are the vision-language model's own);
    other models are returned unchanged."""
    from .tables import VISION_LANGUAGE

    mt = getattr(getattr(hf, "config", None), "model_type", None)
    if mt not in VISION_LANGUAGE:
        return hf
    import transformers as tf

    _, cls_name = VISION_LANGUAGE[mt]
    cls = getattr(tf, cls_name)
    with torch.device("meta"):
        text = cls(hf.config.text_config)
    text.model = get_language_model(hf)
    text.lm_head = hf.lm_head
    text.config._name_or_path = getattr(hf.config, "_name_or_path", "")
    return text.eval()


def get_language_model(hf: nn.Module) -> nn.Module:
    """The language model inside a vision-language model (``model.language_model``)."""
    for path in ("model.language_model", "language_model"):
        obj: Any = hf
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise ArchitectureError(f"cannot find the language model inside {type(hf).__name__}.")


def _from_gguf(path: str, dtype: torch.dtype | str | None, need_tokenizer: bool):
    """A GGUF checkpoint by path, dequantized by transformers (``gguf_file=``); the ``gguf`` package is needed."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"GGUF file {p.name!r} does not exist; give the path of a .gguf file.")
    try:
        import gguf
    except ImportError:
        raise InputError("loading a GGUF checkpoint needs the gguf package: pip install 'hydra-probe[gguf]' "
                         "(or pip install gguf).") from None
    import transformers as tf

    try:
        reader = gguf.GGUFReader(str(p))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a readable GGUF"
        raise InputError(f"{p.name} is not a readable GGUF file ({type(e).__name__}: {e}).") from None
    del reader
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:  # pragma: no cover - older transformers
        GGUF_SUPPORTED_ARCHITECTURES = None
    if GGUF_SUPPORTED_ARCHITECTURES is not None and arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ArchitectureError(
            f"{p.name} holds a GGUF {arch!r} model, which transformers {tf.__version__} cannot read (it reads "
            f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}); convert the checkpoint to safetensors, or use a "
            "GGUF of a supported architecture.")
    try:
        hf = tf.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=resolve_dtype(dtype))
    except ValueError as e:
        raise ArchitectureError(f"transformers cannot read {p.name}: {str(e).splitlines()[0]}") from None
    tok = None
    if need_tokenizer:
        try:
            tok = tf.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        except Exception as e:  # noqa: BLE001 - tokenizer conversion raises many kinds
            raise InputError(f"cannot read a tokenizer from {p.name} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                             "pass tokenizer=AutoTokenizer.from_pretrained(...) of the original model.") from None
    hf.config._name_or_path = p.name
    return hf.eval(), tok, p.name
