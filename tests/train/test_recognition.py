"""Recognition fine-tuning (--task recognition): the label readers, the argument checks, and a tiny CPU run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mugstan_chat.model.dual_encoder import MugStan
from mugstan_chat.synthetic.pairs import write_pair
from mugstan_chat.synthetic.render import COLOURS, Canvas, shape_mask

from mugstan_train import make_shards
from mugstan_train.data import Columns, DataError, read_annotations
from mugstan_train.evaluate import main as evaluate_main
from mugstan_train.params import model_config, parse_args
from mugstan_train.post_pretrain import train
from mugstan_train.recognition_data import ClassIndex, labelled_records, read_class_names, recognition_columns

SSV2 = Path(__file__).resolve().parents[1] / "fixtures" / "ssv2"
SIZE, FRAMES = 32, 12
#: four motion classes; the class names are the captions the text tower encodes
CLASSES = {"horizontal": "moving sideways", "vertical": "moving up or down", "scale": "changing size",
           "fade": "fading in or out"}


def _clip(motion: str, rng: np.random.Generator) -> np.ndarray:
    """A large red square on a dark frame, moving one way: (FRAMES, SIZE, SIZE, 3) uint8.

    Large on purpose: a random tiny CLIP averages its 16 patches almost uniformly, so the
    plain set's small shapes move its [CLS] embedding too little to be learnt in a few steps.
    """
    t = np.linspace(0.0, 1.0, FRAMES)
    c = rng.uniform(0.4, 0.6) * SIZE  # every clip its own position: the held-out clips are new ones
    fixed, ones = np.full(FRAMES, c), np.ones(FRAMES)
    cx, cy, r, alpha = {
        "horizontal": (SIZE * (0.15 + 0.7 * t), fixed, 0.3 * SIZE * ones, ones),
        "vertical": (fixed, SIZE * (0.15 + 0.7 * t), 0.3 * SIZE * ones, ones),
        "scale": (fixed, SIZE - fixed, SIZE * (0.05 + 0.45 * t), ones),
        "fade": (fixed, SIZE - fixed, 0.4 * SIZE * ones, t),
    }[motion]
    canvas = Canvas(np.broadcast_to(np.asarray((30, 30, 30), dtype=np.float64), (SIZE, SIZE, 3)), FRAMES)
    for i in range(FRAMES):
        canvas.paint(i, shape_mask("square", SIZE, cx[i], cy[i], r[i]), COLOURS["red"], alpha[i])
    return canvas.finish()


@pytest.fixture(scope="module")
def motions(tmp_path_factory) -> Path:
    """K400-layout lists (``path,label``) of 4 classes: 40 training and 8 held-out clips per class.

    Each clip is written with its time reversal (same class), and a clip and its reversal
    stay in the same split.
    """
    root = tmp_path_factory.mktemp("motions")
    rng = np.random.default_rng(0)
    rows: dict[str, list[dict]] = {"train": [], "val": []}
    for i in range(24):
        for motion, name in CLASSES.items():
            split = "train" if i < 20 else "val"
            rows[split] += write_pair(root, f"{motion}{i:02d}", _clip(motion, rng), {"label": name}, {"label": name})
    for split, items in rows.items():
        (root / f"{split}.csv").write_text("path,label\n" + "".join(f"{r['video']},{r['label']}\n" for r in items))
    (root / "classes.txt").write_text("\n".join(CLASSES.values()) + "\n")
    return root


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--task", "recognition", "--backbone", "tiny", "--stan-layers", "2", "--frames", "4",
            "--train-data", str(root / "train.csv"), "--preset", "k400", "--video-root", str(root),
            "--class-names", str(root / "classes.txt"), "--eval-data", str(root / "val.csv"), "--eval-preset", "k400",
            "--workers", "0", "--output-dir", str(out), "--diagnostics-interval", "0", "--save-interval", "0",
            "--log-interval", "1", *extra]


def _evals(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "eval"]


def test_finetuning_raises_heldout_top1_above_the_zero_shot_start(motions, tmp_path):
    # 160 training clips, batch 8: 20 steps an epoch, 4 epochs. Mug mode "mean" (the plain CLIP head): with a
    # random text tower the token-level modes tie every class on the tokens all class names share (the
    # start-of-text token's output is the same for every text), and the loss stays at ln 4.
    result = train(_args(motions, tmp_path, "--batch-size", "8", "--epochs", "4", "--lr-backbone", "1e-3",
                         "--lr-stan", "1e-3", "--warmup-steps", "4", "--mug-mode", "mean"))
    evals = _evals(tmp_path)
    assert [e["step"] for e in evals] == [0, 20, 40, 60, 80]  # the start, then every epoch end
    assert all(e["videos"] == 32 and e["classes"] == 4 and e["failed_videos"] == 0 for e in evals)
    start, final = evals[0]["top1"], evals[-1]["top1"]
    assert final == result.eval_metrics["top1"]
    # 32 held-out clips, chance 1/4: a classifier that learnt nothing scores 25% +- 7.7% (binomial sd
    # sqrt(.25 * .75 / 32)); 50% is 3.3 sd above it (P about 0.3%). The start (step 0) is the zero-shot classifier.
    assert final >= 50.0
    assert final > start
    # the exported model is scored by the zero-shot path (same class names, frames from its config) alike
    metrics = tmp_path / "final_eval.json"
    assert evaluate_main(["--checkpoint", str(result.final_dir), "--task", "recognition", "--data",
                          str(motions / "val.csv"), "--preset", "k400", "--video-root", str(motions),
                          "--class-names", str(motions / "classes.txt"), "--workers", "0",
                          "--output", str(metrics)]) == 0
    assert json.loads(metrics.read_text())["top1"] == final


def test_text_tower_stays_frozen_while_the_video_side_trains(motions, tmp_path):
    argv = _args(motions, tmp_path, "--batch-size", "8", "--max-steps", "2", "--lr-backbone", "1e-3",
                 "--lr-stan", "1e-3", "--mug-mode", "mean")
    argv = argv[:argv.index("--eval-data")] + argv[argv.index("--eval-preset") + 2:]  # no evaluation
    result = train(argv)
    fresh = MugStan(model_config("tiny", stan_layers=2, mug_mode="mean"))  # the same seeded start
    trained = result.model.state_dict()
    for name, value in fresh.state_dict().items():
        assert value.equal(trained[name]) == name.startswith("text."), name


def test_shards_carry_the_class_name_as_their_caption(motions, tmp_path):
    """Shards made from the labelled list with the label as caption (make_shards --caption-column label)."""
    records = read_annotations(motions / "train.csv", Columns.preset("k400", caption_column="label"))
    make_shards.write_shards(records[:24], motions, tmp_path / "shards", samples_per_shard=12)
    out = tmp_path / "out"
    result = train(_args(motions, out, "--batch-size", "6", "--max-steps", "3", "--mug-mode", "mean")
                   + ["--train-data", f"{tmp_path}/shards/{{00000..00001}}.tar"])
    assert len(result.losses) == 3 and all(loss > 0 for loss in result.losses)
    assert [e["step"] for e in _evals(out)] == [0, 3]


# --------------------------------------------------------------------------- Something-Something v2's files


def test_ssv2_layout_reads_templates_as_classes():
    names = read_class_names(SSV2 / "something-something-v2-labels.json")
    assert names[:2] == ["Approaching something with your camera", "Attaching something to something"]
    columns = recognition_columns(Columns.preset("ssv2"))
    records = labelled_records(read_annotations(SSV2 / "something-something-v2-train.json", columns),
                               ClassIndex(names), "train.json")
    assert [r.video for r in records[:2]] == ["78687.webm", "42326.webm"]
    assert [r.captions for r in records[:3]] == [["Attaching something to something"],
                                                 ["Bending something so that it deforms"],
                                                 ["Approaching something with your camera"]]
    assert records[0].extra["placeholders"] == ["a sticker", "a notebook"]
    with pytest.raises(DataError, match="missing column 'template'"):  # the test split has no labels
        read_annotations(SSV2 / "something-something-v2-test.json", columns)


def test_class_index_reads_names_templates_and_indices(tmp_path):
    classes = ClassIndex(["abseiling", "Putting something onto something"])
    assert classes("abseiling", "x") == 0
    assert classes("Putting [something] onto [something]", "x") == 1
    assert classes("1", "x") == 1
    with pytest.raises(DataError, match="row 3: label 'surfing' is neither"):
        classes("surfing", "row 3")
    for text, message in (("[1, 2]", "expected a list of names"), ('{"a": "0", "b": "2"}', "must be 0..1"),
                          ('{"a": "x"}', "map each class name to its index"), ("[]", "names no class"),
                          ('["a", "a"]', "appears twice")):
        path = tmp_path / "classes.json"
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            read_class_names(path)


def test_ssv2_preset_trains_end_to_end(motions, tmp_path):
    """The published JSON layout through the trainer (videos renamed ``{id}.mp4`` by --video-template)."""
    root = tmp_path / "ssv2"
    root.mkdir()
    labels = read_class_names(SSV2 / "something-something-v2-labels.json")
    for split in ("train", "validation"):
        entries = json.loads((SSV2 / f"something-something-v2-{split}.json").read_text())
        for k, entry in enumerate(entries):  # any clip stands in for the video
            shutil.copy(motions / f"horizontal{k:02d}_a.mp4", root / f"{entry['id']}.mp4")
        (root / f"{split}.json").write_text(json.dumps(entries))
    out = tmp_path / "out"
    train(["--task", "recognition", "--backbone", "tiny", "--stan-layers", "2", "--frames", "4",
           "--train-data", str(root / "train.json"), "--preset", "ssv2", "--video-template", "{id}.mp4",
           "--video-root", str(root), "--class-names", str(SSV2 / "something-something-v2-labels.json"),
           "--eval-data", str(root / "validation.json"), "--eval-preset", "ssv2", "--eval-video-template", "{id}.mp4",
           "--workers", "0", "--batch-size", "3", "--max-steps", "2", "--output-dir", str(out),
           "--diagnostics-interval", "0", "--save-interval", "0"])
    evals = _evals(out)
    assert [e["step"] for e in evals] == [0, 2]
    assert all(e["videos"] == 4 and e["classes"] == len(labels) for e in evals)


# --------------------------------------------------------------------------- arguments


def test_recognition_arguments_are_checked_before_the_model(motions, tmp_path, capsys):
    base = _args(motions, tmp_path / "out")
    bad_labels = tmp_path / "bad.csv"
    bad_labels.write_text("path,label\nhorizontal00_a.mp4,moving sideways\nvertical00_a.mp4,surfing\n")
    duplicated = tmp_path / "dup.txt"
    duplicated.write_text("a\nb\na\n")
    no_label = tmp_path / "nolabel.csv"
    no_label.write_text("path,caption\nhorizontal00_a.mp4,x\n")
    cases = [
        ([a for a in base if a != "--class-names" and a != str(motions / "classes.txt")],
         "--task recognition needs --class-names FILE"),
        (base + ["--train-data", str(bad_labels)],
         f"--train-data {bad_labels}, video vertical00_a.mp4: label 'surfing' is neither one of the 4 class names"),
        (base + ["--eval-data", str(bad_labels)], f"--eval-data {bad_labels}, video vertical00_a.mp4: label 'surfing'"),
        (base + ["--class-names", str(duplicated)], f"--class-names {duplicated}: class 'a' appears twice"),
        (base + ["--class-names", str(tmp_path / "missing.txt")], "--class-names"),
        (base + ["--train-data", str(no_label)], "missing column 'label'"),
        (["--backbone", "tiny", "--train-data", str(motions / "train.csv"), "--preset", "k400",
          "--output-dir", str(tmp_path / "o")], "its layout has no caption column"),
        (["--backbone", "tiny", "--train-data", str(motions / "train.csv"), "--class-names", "x.txt",
          "--output-dir", str(tmp_path / "o")], "--class-names is for --task recognition"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as raised:
            parse_args(argv)
        assert raised.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert ": error: " in err[-1] and message in err[-1], err  # argparse: usage, then the one error line
    assert not (tmp_path / "out").exists()  # nothing was written
