"""Where the label disagreement with MONAI comes from: one run of each engine variant.

``python -m benchmarks.agreement [WEIGHTS] [OVERLAP]`` segments the item-1 input once
with MONAI's constant-mode fp32 ``sliding_window_inference`` (the Dice reference) and
once per variant of our engine, printing each variant's label Dice against it:
the shipped default, constant weighting in bf16 and in fp32, and the same without the
crop's alignment to the pooling lattice (:func:`LiverTumorSegLib.boxes.align_box`).
One repetition each: this explains the agreement figures of ``bench_inference``; it
times nothing.
"""

from __future__ import annotations

import sys
import time


def main(argv=None) -> None:
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference

    from LiverTumorSegLib import pipeline
    from LiverTumorSegLib.model import load_model
    from LiverTumorSegLib.pipeline import Segmenter, SegmentOptions
    from LiverTumorSegLib.preprocess import scale_intensity

    from . import inputs, weights
    from .bench_inference import _full_logits, label_dice

    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(2)
    model = load_model(argv[0] if argv else weights.ensure_weights())
    overlap = float(argv[1]) if len(argv) > 1 else weights.SEED_OVERLAP
    hu, truth = inputs.model_grid_phantom((256, 256, 200))
    x = scale_intensity(hu, model.card.intensity)
    t = time.perf_counter()
    with torch.inference_mode():
        ref = sliding_window_inference(torch.from_numpy(x)[None, None], tuple(model.card.patch_size), 2,
                                       model.network.eval(), overlap=overlap, mode="constant")[0]
    ref = ref.argmax(0).numpy().astype(np.uint8)
    print(f"MONAI constant fp32: {time.perf_counter() - t:.0f} s; vs truth {label_dice(ref, truth)}", flush=True)
    aligned = pipeline.align_box
    variants = [("default", {}, True), ("default, unaligned crop", {}, False),
                ("constant bf16", dict(weighting="constant"), True),
                ("constant fp32", dict(weighting="constant", precision="fp32"), True),
                ("constant fp32, unaligned crop", dict(weighting="constant", precision="fp32"), False)]
    try:
        for name, options, align in variants:
            pipeline.align_box = aligned if align else (lambda box, *args: box)
            seg = Segmenter(model, SegmentOptions(device="cpu", overlap=overlap, batch_size=2, **options))
            logits, box = seg.infer_logits(hu)
            labels = _full_logits(logits, box, hu.shape).argmax(0)
            print(f"{name}: box {[(s.start, s.stop) for s in box]}, vs MONAI constant {label_dice(labels, ref)}",
                  flush=True)
    finally:
        pipeline.align_box = aligned


if __name__ == "__main__":
    main()
