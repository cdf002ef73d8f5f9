"""A decode step's LLaMA-family layer stack in one kernel call (`CpuKernels.decode_layers`, csrc/decode_layer.cpp)
is bitwise the modules' own forward: the same tokens and the same log-probabilities, through the real engine, for
packed K-quants with q/k/v biases (Qwen2), per-head q/k norms (Qwen3), block-32 types, a float16 KV cache,
several sequences per step, and the deterministic mode. Where it cannot run, the modules run instead."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from autoglm.gguf.writer import convert_text
from autoglm.kernels.cpu.ops import CpuKernels
from autoglm.llm import LLM
from autoglm.models.llama import LlamaModel
from tests.models.harness import tiny_checkpoint

PROMPTS = ["the quick brown fox", "a b c d e f g h i j k l m n o p", "hello"]
SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)  # fmt: skip  # K-quants need rows of 256


def _gguf(tmp: Path, arch: str, outtype: str) -> Path:
    if arch == "qwen2":
        from transformers import Qwen2Config as C
        from transformers import Qwen2ForCausalLM as M
    else:
        from transformers import Qwen3Config as C  # type: ignore[assignment]
        from transformers import Qwen3ForCausalLM as M  # type: ignore[assignment]
    hf = tiny_checkpoint(M, C, tmp / f"{arch}-hf", **SHAPE, **({"head_dim": 64} if arch == "qwen3" else {}))
    return convert_text(hf, tmp / f"{arch}-{outtype}.gguf", outtype=outtype)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("decode_layers")
    return {"qwen2-q4_k_m": _gguf(tmp, "qwen2", "q4_k_m"), "qwen3-q8_0": _gguf(tmp, "qwen3", "q8_0")}


class _Count:
    """The kernels' extension with its `decode_layers` calls counted."""

    def __init__(self, ext: Any) -> None:
        self.ext, self.calls = ext, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ext, name)

    def decode_layers(self, *args: Any) -> torch.Tensor:
        self.calls += 1
        return self.ext.decode_layers(*args)


def _generate(llm: LLM, fused: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[list[Any], int]:
    kernels = {m.impl for m in llm.model.decoder.modules() if isinstance(getattr(m, "impl", None), CpuKernels)}
    assert len(kernels) == 1
    (k,) = kernels
    count = _Count(k.ext)
    with monkeypatch.context() as m:
        m.setattr(k, "ext", count)
        if not fused:
            m.setattr(LlamaModel, "_decode_in_one_call", lambda self, h, rope, ctx: None)
        out = llm.generate(PROMPTS, max_tokens=12, temperature=0, ignore_eos=True, logprobs=5)
    return [(r.token_ids, r.logprobs) for r in out], count.calls


@pytest.fixture
def llm_of(files: dict[str, Path]) -> Iterator[Any]:
    made: list[LLM] = []

    def make(name: str, **kw: Any) -> LLM:
        llm = LLM(str(files[name]), max_model_len=128, block_size=4, **kw)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.close()


@pytest.mark.parametrize(
    "name, kw",
    [
        ("qwen2-q4_k_m", {}),
        ("qwen2-q4_k_m", {"kv_cache_dtype": "float16"}),
        ("qwen2-q4_k_m", {"kv_cache_dtype": "bfloat16"}),
        ("qwen2-q4_k_m", {"deterministic": True}),
        ("qwen2-q4_k_m", {"cpu_isa": "scalar"}),  # no packed tiles: every weight in file order
        ("qwen2-q4_k_m", {"cpu_isa": "avx2"}),
        ("qwen3-q8_0", {}),
    ],
    ids=["qwen2-q4_k_m", "float16-kv", "bfloat16-kv", "deterministic", "scalar-file-order", "avx2", "qwen3-q8_0"],
)
def test_one_call_is_bitwise_the_modules(llm_of: Any, monkeypatch: pytest.MonkeyPatch, name: str, kw: dict) -> None:
    llm = llm_of(name, **kw)
    reads = []
    read = CpuKernels.decode_stack
    monkeypatch.setattr(CpuKernels, "decode_stack", lambda self, layers: reads.append(1) or read(self, layers))
    fused, calls = _generate(llm, True, monkeypatch)
    # every decode step ran as one call (12 tokens: 11 decode steps, all three sequences in each), over the operands
    # the runner read once when it was built (prepare_decode): no step read the modules again
    assert calls == 11
    assert reads == []
    modules, none = _generate(llm, False, monkeypatch)
    assert none == 0
    assert fused == modules
    assert len({tuple(t) for t, _ in fused}) == len(PROMPTS)  # the sequences did not collapse into one


def test_the_files_exercise_what_the_kernel_takes_apart(llm_of: Any) -> None:
    """Packed Q4_K and Q6_K (the q4_k_m mixture), file-order rows (scalar variant), q/k/v biases, Qwen3's q/k norms."""
    for isa, kind in (("avx512", 0), ("scalar", 1)):
        llm = llm_of("qwen2-q4_k_m", cpu_isa=isa)
        mods = [layer.decode_modules() for layer in llm.model.decoder.model.layers]
        linears = [lin for m in mods for lin in m.linears]
        assert {lin.impl.gemv_kind(lin.weight_format) for lin in linears} == {kind}
        assert {"Q4_K", "Q6_K"} <= {lin.weight_format.qtype.name for lin in linears}
        assert all(lin.bias is not None for m in mods for lin in m.linears[:3])
    qwen3 = llm_of("qwen3-q8_0").model.decoder.model.layers[0].decode_modules()
    assert qwen3.q_norm is not None and qwen3.k_norm is not None


def test_modules_run_where_the_kernel_cannot(llm_of: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder whose norms are not LLaMA's RMSNorm on these kernels (here: one norm rebound to the torch
    reference) keeps the module path, with the same result as before the change. The runner read the stack's
    operands once (`prepare_decode`), so a change made afterwards counts once that is called again."""
    from autoglm.kernels.reference import REFERENCE

    llm = llm_of("qwen2-q4_k_m")
    decoder = llm.model.decoder
    before, _ = _generate(llm, False, monkeypatch)
    norm = decoder.model.layers[1].post_attention_layernorm
    monkeypatch.setattr(norm, "kernels", REFERENCE)
    assert decoder.prepare_decode() is False  # no stack kept: every step reads the modules and finds the norm
    out, calls = _generate(llm, True, monkeypatch)
    assert calls == 0
    monkeypatch.undo()
    assert decoder.prepare_decode() is True
    # the reference norm sums in another order: tokens stay, log-probabilities within float32 rounding
    assert [t for t, _ in out] == [t for t, _ in before]


@pytest.mark.parametrize("rows", [1, 3, 16])
def test_many_weights_in_one_region_are_bitwise_each_alone(rows: int) -> None:
    """`gemv_packed_many` (a layer's q/k/v and gate/up in one parallel region): each output bitwise `gemv_packed`
    of its weight alone, for Q4_K and Q6_K together (both on q8_K activations) and for a block-32 type."""
    from gguf import GGMLQuantizationType as Q

    from autoglm.gguf.quants import quantize
    from autoglm.kernels.cpu import cpu_kernels
    from autoglm.layers.linear.gguf import GGUFBlockFormat

    k = cpu_kernels()
    assert k is not None and k.has_packed
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 512, generator=g)
    for types in ((Q.Q4_K, Q.Q6_K, Q.Q4_K), (Q.Q8_0, Q.Q8_0)):
        packed = []
        for i, qt in enumerate(types):
            n = (64, 32, 48)[i]
            raw = torch.from_numpy(quantize((torch.randn(n, 512, generator=g) * 0.05).numpy(), qt))
            packed.append(k.pack(raw, GGUFBlockFormat(qt, n, 512)))
        many = k.ext.gemv_packed_many(x, packed, [int(t) for t in types])
        for y, w, qt in zip(many, packed, types, strict=True):
            assert torch.equal(y, k.ext.gemv_packed(x, w, int(qt)))
    with pytest.raises(RuntimeError, match="other activations"):
        k.ext.gemv_packed_many(x, packed[:1] * 2, [int(Q.Q8_0), int(Q.Q4_K)])
