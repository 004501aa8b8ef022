"""Recognition fine-tuning: Kinetics-400 / Something-Something v2 (paper section III-D, Table III).

Run by the trainer with ``--task recognition`` (training/post_pretrain.py; commands in
docs/training.md)::

    python training/post_pretrain.py --task recognition --init-from runs/mugstan/final --init-stan \\
        --train-data k400_train.csv --preset k400 --video-root k400/videos --class-names k400_classes.txt \\
        --eval-data k400_val.csv --eval-preset k400 --frames 8 --lr-backbone 8e-6 --lr-stan 8e-5 ...

What fine-tuning means here. The classifier is the one zero-shot recognition
already uses (``training/evaluate.py --task recognition``): every class name,
without a prompt template, is encoded by the text tower, and a clip's logit for
class c is the Mug score of (class name c, clip) times CLIP's logit scale
(tau = 100). Fine-tuning trains the video side (backbone at ``--lr-backbone``,
STAN at ``--lr-stan``) with the **cross-entropy of those logits over all C
classes**, and keeps the text tower frozen, as the paper does for recognition
(docs/design.md section 3: 8 frames, lr 8e-6 / 8e-5, text encoder frozen, class
names without templates). Cross-entropy rather than the post-pretraining InfoNCE
because a batch of labelled clips repeats classes (128 clips of 400 K400 classes,
of 174 SSv2 ones): in-batch InfoNCE would push a clip away from its own class
name whenever another clip of that class shares the batch, while the
cross-entropy scores every clip against every class, batch or not, and needs no
gather across ranks. At step 0 the model is exactly the zero-shot classifier, so
the first evaluation (step 0) is the zero-shot start, and the exported model is
scored by ``training/evaluate.py --task recognition`` with the same class names.

Everything else is the trainer's: data (a labelled list becomes records whose one
caption is the class name; shards carry the class name, an SSv2 template or an
index as their caption), the AdamW groups and schedule, checkpoints and resume,
metrics.jsonl (``eval`` records with ``top1``/``top5`` at step 0 and every epoch end).
"""

from __future__ import annotations

import argparse
import logging

import torch
import torch.nn.functional as F

from mugstan_chat.model.backbone import TextFeatures
from mugstan_chat.model.dual_encoder import MugStan
from mugstan_chat.model.mug import score_matrix
from mugstan_chat.model.tokenizer import TokenizedText

from mugstan_train.data import ClipSettings, VideoRecord, read_annotations
from mugstan_train.distributed import DistEnv, all_reduce_sum
from mugstan_train.evaluate import evaluate_recognition
from mugstan_train.params import columns_from_args
from mugstan_train.recognition_data import ClassIndex, labelled_records, read_class_names, recognition_columns
from mugstan_train.shards import expand_shards, is_shard_spec, read_shard_records

logger = logging.getLogger(__name__)


def freeze_text_tower(model: MugStan) -> None:
    """The paper's recognition setting: the class-name embeddings stay those of the pretrained text tower."""
    for param in model.text.parameters():
        param.requires_grad_(False)


def class_logits(model: MugStan, classes: TextFeatures, frames: torch.Tensor) -> torch.Tensor:
    """(B, C) logits: tau x the Mug score of each clip's frames (B, T, P) against each class name."""
    scores = score_matrix(classes.tokens.float(), classes.mask, classes.pooled.float(), frames.float(),
                          config=model.config.mug)  # (C, B)
    return model.config.mug.tau * scores.T


class RecognitionTask:
    """The trainer's hooks for ``--task recognition`` (see :func:`mugstan_train.train.train_step`)."""

    def __init__(self, class_names: list[str], tokens: TokenizedText):
        self.classes = ClassIndex(class_names)
        self.tokens = tokens  # the class names, tokenised once: encoded with every batch (frozen tower)
        self.eval_records: list[VideoRecord] | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, model: MugStan) -> "RecognitionTask":
        """Reads ``--class-names`` and freezes ``model``'s text tower (before the optimiser is built)."""
        freeze_text_tower(model)
        names = read_class_names(args.class_names)
        logger.info("recognition fine-tuning over %d classes (text tower frozen)", len(names))
        return cls(names, model.build_tokenizer()(names))

    # ------------------------------------------------------------- training

    def train_records(self, args: argparse.Namespace) -> list[VideoRecord]:
        """The labelled ``--train-data`` list, each record captioned by its class name."""
        records = read_annotations(args.train_data, recognition_columns(columns_from_args(args)))
        return labelled_records(records, self.classes, f"--train-data {args.train_data}")

    def text(self, batch: dict, tokenizer) -> TokenizedText:
        """Every class name, whatever the batch holds: the logits cover all classes."""
        return self.tokens

    def labels(self, batch: dict, device: torch.device) -> torch.Tensor:
        """(B,) class index of each clip, from its caption (a class name; in shards also a template or index)."""
        return torch.tensor([self.classes(caption, "a training sample's caption") for caption in batch["captions"]],
                            device=device)

    def loss(self, frames: torch.Tensor, classes: TextFeatures, batch: dict, model: MugStan,
             env: DistEnv) -> torch.Tensor:
        """Mean cross-entropy of this rank's clips; its value is the mean over all ranks.

        DDP averages the gradients of the ranks' local means, which is the gradient of
        the global mean (equal batches per rank). The value is made global so that every
        rank sees the same loss and skips, or applies, a non-finite step together.
        """
        loss = F.cross_entropy(class_logits(model, classes, frames), self.labels(batch, frames.device))
        if env.world_size > 1:
            mean = all_reduce_sum([float(loss.detach())], env)[0] / env.world_size
            loss = loss + (mean - loss.detach())
        return loss

    # ------------------------------------------------------------- evaluation

    def evaluate(self, model: MugStan, args: argparse.Namespace, clip: ClipSettings,
                 device: torch.device) -> dict[str, float]:
        """Top-1/top-5 (percent) of ``--eval-data`` against every class name (rank 0)."""
        if self.eval_records is None:  # read once per run
            if is_shard_spec(args.eval_data):  # labelled by their captions
                self.eval_records = read_shard_records(expand_shards(args.eval_data, flag="--eval-data"),
                                                       args.caption_key)
            else:
                self.eval_records = read_annotations(args.eval_data,
                                                     recognition_columns(columns_from_args(args, "eval_")))
        return evaluate_recognition(model, self.eval_records, self.classes.names, args.eval_video_root or
                                    args.video_root, clip, device, args.eval_batch_size, args.workers,
                                    args.precision)
