"""Precision, attention kernel, activation memory and 4-bit loading for the training stages.

One call decides them all, before the TrainingArguments are built and the model is loaded::

    acceleration = choose_acceleration(read_model_config(options.model), training,
                                       attention=options.attention, load_in_4bit=options.load_in_4bit)
    training_args = build_training_arguments(options.out, training, acceleration.defaults(TRAINING_DEFAULTS))
    chain = load_chain(options.model, options.adapter, dtype=acceleration.load_dtype(options.dtype), ...)
    model = acceleration.prepare(chain.model)      # attention kernel; NF4 quantisation with --load-in-4bit
    print(acceleration.line)                       # what was chosen, and why

What is chosen (the user's own ``--bf16`` / ``--fp16`` / ``--gradient-checkpointing`` always win):

- **precision**: bf16 mixed precision on a CUDA device that supports it; otherwise what the flags say
  (float32 by default: CPUs and pre-Ampere GPUs). Mixed precision keeps float32 master weights,
  so trained rows and LoRA weights stay full precision.
- **attention**: flash-attention 2 when the ``flash_attn`` package is installed, a CUDA device is
  used and the compute is half precision; PyTorch's SDPA otherwise. Both read packed blocks'
  ``position_ids`` restarts as document boundaries (``zhllama.pretrain.packing``).
- **gradient checkpointing**: on above :data:`CHECKPOINTING_ABOVE` parameters, where activations
  rather than weights fill a 24 GB GPU; below it, recomputation only costs time.
- **4-bit (QLoRA)**, only when asked: the chain's adapters are merged into the (bf16) weights
  first, then every linear layer but the LM head becomes a bitsandbytes NF4 layer (double
  quantisation, bf16 compute); embeddings, LM head and norms stay unquantised, in float32, so the
  trainable-token rows train at full precision. Refused without a CUDA device or without
  bitsandbytes, with what to do.

The choice is a pure function of the model config, the user's training values and the device,
so it is tested on CPU by passing ``device``.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

from zhllama.args import Options
from zhllama.errors import ZhllamaError
from zhllama.options import option

ATTENTION_CHOICES = ("auto", "sdpa", "flash_attention_2", "eager")
# above this size activations, not weights, are what no longer fit a single GPU
CHECKPOINTING_ABOVE = 1_000_000_000
FOUR_BIT_SKIP = ("lm_head",)  # stays a full-precision matrix: its rows train (trainable tokens)


@dataclass(kw_only=True)
class AccelArgs(Options):
    """Attention kernel and 4-bit loading (precision and checkpointing are TrainingArguments flags)."""

    attention: str = option(
        "auto", choices=ATTENTION_CHOICES, help="attention kernel: auto = flash_attention_2 when installed on a CUDA GPU, else sdpa"
    )
    load_in_4bit: bool = option(False, help="QLoRA: quantise the frozen linear layers to NF4 (bitsandbytes, CUDA only)")

    def problems(self) -> list[str]:
        if self.attention not in ATTENTION_CHOICES:
            return [f"--attention must be one of {', '.join(ATTENTION_CHOICES)} (got {self.attention!r})"]
        return []


def read_model_config(model_dir: str | Path) -> dict:
    """A model directory's ``config.json`` as a dict (read before any weight is loaded)."""
    from zhllama.chain import check_model_dir

    path = check_model_dir(model_dir) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ZhllamaError(f"{path}: unreadable model config: {e}") from e


def _get(config, name: str, default=None):
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def estimate_parameters(config) -> int:
    """Parameters of a LLaMA-shaped model from its config (dict or ``PretrainedConfig``), without weights."""
    hidden, layers = _get(config, "hidden_size"), _get(config, "num_hidden_layers")
    vocab, inner = _get(config, "vocab_size"), _get(config, "intermediate_size")
    heads = _get(config, "num_attention_heads")
    kv_heads = _get(config, "num_key_value_heads") or heads
    head_dim = _get(config, "head_dim") or hidden // heads
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
    per_layer = attention + 3 * hidden * inner + 2 * hidden  # gate, up, down; two norms
    matrices = 1 if _get(config, "tie_word_embeddings", False) else 2
    return layers * per_layer + matrices * vocab * hidden + hidden


def given_values(training) -> dict:
    """The TrainingArguments values the user chose: a dict as given, a ``TrainingArguments``'
    non-default fields, or nothing."""
    if training is None:
        return {}
    if isinstance(training, dict):
        return dict(training)
    from zhllama.training import explicit_training_values

    return explicit_training_values(training)


@dataclass
class Device:
    """What the choice depends on: the device type, its name, and whether it computes bf16."""

    type: str  # "cuda" or "cpu"
    name: str = "cpu"
    bf16: bool = False

    @classmethod
    def detect(cls, use_cpu: bool = False) -> "Device":
        import torch

        if use_cpu or not torch.cuda.is_available():
            return cls("cpu")
        return cls("cuda", torch.cuda.get_device_name(0), bool(torch.cuda.is_bf16_supported()))


@dataclass
class Acceleration:
    """What :func:`choose_acceleration` decided, and the reasons, for one training run."""

    device: Device
    precision: str  # "bf16", "fp16" or "fp32" (mixed precision over float32 master weights)
    attention: str  # attn_implementation
    gradient_checkpointing: bool
    load_in_4bit: bool
    parameters: int
    training_values: dict = field(default_factory=dict)  # TrainingArguments values we chose
    reasons: dict = field(default_factory=dict)

    def defaults(self, base: dict) -> dict:
        """A stage's TrainingArguments defaults with our choices on top (the user's values go over both)."""
        return {**base, **self.training_values}

    def load_dtype(self, requested: str) -> str:
        """The dtype to load weights in: 4-bit quantises from bf16 unless another half dtype was asked."""
        return "bfloat16" if self.load_in_4bit and requested == "float32" else requested

    def prepare(self, model):
        """Set the attention kernel and, with 4-bit, quantise ``model`` (adapters already merged)."""
        model.set_attn_implementation(self.attention)
        # training never reads a KV cache, and building one hides packed documents' boundaries
        # from the attention mask (transformers checks packing only without a cache)
        model.config.use_cache = False
        if self.load_in_4bit:
            import os

            # each process of a multi-GPU run quantises onto its own GPU
            model = quantize_4bit(model, device=f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        return model

    def describe(self) -> dict:
        """What ``zhllama.json`` records of the choice."""
        return {
            "device": self.device.name if self.device.type == "cuda" else "cpu",
            "precision": self.precision,
            "attention": self.attention,
            "gradient_checkpointing": self.gradient_checkpointing,
            "load_in_4bit": self.load_in_4bit,
            "line": self.line,
        }

    @property
    def line(self) -> str:
        """One line saying what was chosen and why."""
        where = self.device.type if self.device.type == "cpu" else f"cuda ({self.device.name})"
        parts = [
            f"{self.precision} ({self.reasons['precision']})",
            f"attention {self.attention} ({self.reasons['attention']})",
            f"gradient checkpointing {'on' if self.gradient_checkpointing else 'off'} ({self.reasons['checkpointing']})",
        ]
        if self.load_in_4bit:
            parts.append("weights NF4 4-bit (double quantisation, bf16 compute; embeddings and LM head float32)")
        return f"acceleration: {where}, {self.parameters / 1e9:.2f}B parameters: " + ", ".join(parts)


def flash_attention_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def choose_acceleration(
    config,
    training=None,
    *,
    attention: str = "auto",
    load_in_4bit: bool = False,
    packed_rows: bool = False,
    device: Device | None = None,
) -> Acceleration:
    """Decide precision, attention kernel, gradient checkpointing and 4-bit loading for a run.

    ``config``: the model's config (``config.json`` as a dict, or a ``PretrainedConfig``).
    ``training``: the TrainingArguments values the user chose (the stage function's ``training``:
    a dict, a ``TrainingArguments`` or None); whatever they set is kept. ``device`` defaults to
    the one the Trainer will use. ``packed_rows``: batches of several rows whose ``position_ids``
    restart inside a row (``sft --packing``); transformers' flash-attention reads such restarts
    only in a batch of one row, so they get SDPA. Raises :class:`ZhllamaError` for a choice this machine cannot run.
    """
    given = given_values(training)
    device = device or Device.detect(bool(given.get("use_cpu")))
    parameters = estimate_parameters(config)
    chosen: dict = {}
    reasons: dict = {}

    if given.get("bf16") or given.get("fp16"):
        precision, reasons["precision"] = ("bf16" if given.get("bf16") else "fp16"), "as asked"
    elif device.type == "cuda" and device.bf16 and not ("bf16" in given or "fp16" in given):
        precision, reasons["precision"] = "bf16", "auto: this GPU computes bf16"
        chosen["bf16"] = True
    else:
        precision = "fp32"
        reasons["precision"] = "as asked" if "bf16" in given else f"auto: no bf16 on {device.type}"

    flash = flash_attention_installed()
    if attention == "auto":
        if flash and device.type == "cuda" and precision != "fp32" and not packed_rows:
            attention, reasons["attention"] = "flash_attention_2", "auto: flash_attn installed"
        else:
            why = (
                "flash_attn not installed" if not flash
                else "packed rows need SDPA's mask" if packed_rows
                else "flash-attention needs a CUDA GPU and bf16/fp16"
            )  # fmt: skip
            attention, reasons["attention"] = "sdpa", f"auto: {why}"
    else:
        reasons["attention"] = "as asked"
        if attention == "flash_attention_2" and packed_rows:
            raise ZhllamaError(
                "--attention flash_attention_2 would attend across the samples of a packed row (transformers reads "
                "the restarts only in one-row batches); use --attention sdpa with --packing"
            )
        if attention == "flash_attention_2" and not (flash and device.type == "cuda"):
            raise ZhllamaError(
                "--attention flash_attention_2 needs a CUDA GPU and the flash-attn package "
                "(pip install flash-attn --no-build-isolation); or use --attention sdpa"
            )

    if "gradient_checkpointing" in given:
        checkpointing, reasons["checkpointing"] = bool(given["gradient_checkpointing"]), "as asked"
    else:
        checkpointing = parameters > CHECKPOINTING_ABOVE
        reasons["checkpointing"] = f"auto: {'above' if checkpointing else 'at most'} {CHECKPOINTING_ABOVE / 1e9:g}B parameters"
        if checkpointing:
            # non-re-entrant checkpointing keeps the gradients of frozen-input layers (LoRA, 4-bit)
            chosen.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})

    if load_in_4bit:
        check_4bit_possible(device)
    return Acceleration(device, precision, attention, checkpointing, load_in_4bit, parameters, chosen, reasons)


def check_4bit_possible(device: Device) -> None:
    """Refuse ``--load-in-4bit`` where bitsandbytes' NF4 training cannot run, saying what to do."""
    if device.type != "cuda":
        raise ZhllamaError(
            "--load-in-4bit needs a CUDA GPU (bitsandbytes NF4) and none is in use here; "
            "drop --load-in-4bit to train in float32/bf16, or run on a GPU machine"
        )
    if not bitsandbytes_installed():
        raise ZhllamaError("--load-in-4bit needs the bitsandbytes package: pip install bitsandbytes")


def quantize_4bit(model, *, device: str = "cuda", skip: tuple[str, ...] = FOUR_BIT_SKIP):
    """Replace every ``nn.Linear`` of ``model`` but ``skip`` by a bitsandbytes NF4 layer on ``device``.

    The weights are taken as they are (the chain's adapters already merged into them), quantised
    with double quantisation (the block scales quantised too) and computed in bf16. Every other
    floating parameter (embeddings, LM head, norms) becomes float32 so rows trained through them
    are full precision. Works in place and returns the model.
    """
    import bitsandbytes as bnb
    import torch

    head = model.get_output_embeddings()
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head and name.split(".")[-1] not in skip
    ]
    for name, linear in targets:
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=torch.bfloat16,
            compress_statistics=True,  # double quantisation
            quant_type="nf4",
            device="meta",
        )
        quantized.weight = bnb.nn.Params4bit(
            linear.weight.data.to(torch.bfloat16), requires_grad=False, compress_statistics=True, quant_type="nf4"
        )
        if linear.bias is not None:
            quantized.bias = torch.nn.Parameter(linear.bias.data.float(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, quantized.to(device))
        del linear
    for parameter in model.parameters():
        if parameter.dtype in (torch.float16, torch.bfloat16):
            parameter.data = parameter.data.float()
    model.to(device)
    # with frozen quantised layers only the adapters need gradients; the inputs must carry them
    # through checkpointed layers
    model.enable_input_require_grads()
    return model
