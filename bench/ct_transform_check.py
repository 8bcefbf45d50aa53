"""Does a packed compressed-tensors checkpoint's ``transform_config`` reproduce tritonq's online Hadamard on a real
model? (issue 24 item 2; ``engine/formats/ct_transform.py``)

The fake-quantized output (plain float weights, ``down_proj`` already holding ``T^T``) is loaded twice with
transformers: once with tritonq's transform attached from its record, once with compressed-tensors'
``apply_transform_config`` run on the packed checkpoint's ``transform_config`` (its online entries, as vLLM takes
them) and the stored matrix loaded into the modules it creates. Both run in float32 without activation quantization,
so the logits differ only by float rounding; a third load without any transform is the control.
Usage: ``python -m tritonq.bench.ct_transform_check FAKE_DIR CT_DIR [--data FILE] [--tokens N]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean() / b.pow(2).mean())


def main(argv: list[str] | None = None) -> None:
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..engine.formats.ct_transform import matrix_key
    from ..engine.online_hadamard import attach_saved

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fake")
    parser.add_argument("ct")
    parser.add_argument("--data", default="/work/shared/data/wikitext2_test.txt")
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args(argv)

    text = Path(args.data).read_text(encoding="utf-8")[:20000]
    ids = AutoTokenizer.from_pretrained(args.fake)(text, return_tensors="pt").input_ids[:, : args.tokens]
    config = json.loads((Path(args.ct) / "config.json").read_text())
    tcfg = TransformConfig.model_validate(config["quantization_config"]["transform_config"])
    for scheme in tcfg.config_groups.values():
        scheme.apply = [a for a in scheme.apply if a.is_online()]  # the weights already hold the weight_input part
    with safe_open(str(Path(args.ct) / "model.safetensors"), "pt") as f:
        stored = f.get_tensor(matrix_key(config))

    def logits(kind: str) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(args.fake, dtype=torch.float32).eval()
        if kind == "tritonq":
            attach_saved(model, args.fake)
        elif kind == "compressed-tensors":
            apply_transform_config(model, tcfg)
            model.load_state_dict({matrix_key(config): stored}, strict=False)
        with torch.no_grad():
            return model(input_ids=ids).logits

    ours = logits("tritonq")
    for kind in ("compressed-tensors", "none"):
        got = logits(kind)
        same = float((got.argmax(-1) == ours.argmax(-1)).float().mean())
        print(f"{kind:>18}: relative MSE of the logits against tritonq's {_relative(got, ours):.3e}, "
              f"max |diff| {float((got - ours).abs().max()):.3e}, same argmax {same:.4f}")
    print(f"matrix {matrix_key(config)}: {tuple(stored.shape)} {stored.dtype}, entries +-1: "
          f"{bool(stored.abs().eq(1).all())}; {ids.shape[1]} tokens")


if __name__ == "__main__":
    main()
