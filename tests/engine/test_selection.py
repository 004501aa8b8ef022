"""Question-aware clip selection for real (docs/design.md section 4c), through the chat's own loading path.

A tiny dual encoder (CLIP at the demo tower's size, STAN fused at layer N-2 as a branch for LLaVA)
is trained here on synthetic "a <colour> <shape>" clips: first as plain CLIP (Mug mode ``mean``,
standing in for CLIP's own pretraining), then with the Mug head (``frame-token``, the
post-pretraining). Six (colour, shape) objects are held out of training. Captions are short
descriptions and questions ("when does the red circle appear?"). The trained CLIP is
saved as a transformers checkpoint, the branch exported naming it, and its vision weights copied
into a tiny LLaVA, which ``load_chat_model`` then loads with the branch: selection takes the text
tower, projection and Mug mode from the branch's export, as it would for a real LLaVA.

Long videos are made of six segments, each one held-out object, rendered fresh; asking about one
object must choose a candidate inside its segment.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from mugstan_chat.model.backbone import BackboneConfig, tiny_backbone_config
from mugstan_chat.engine.conversation import ChatSession, GenerationSettings
from mugstan_chat.llava.demo import DemoSizes, build_demo_llava, save_demo_branch
from mugstan_chat.engine.feature_cache import FeatureCache
from mugstan_chat.llava.loader import load_chat_model
from mugstan_chat.model.loss import mug_contrastive_loss
from mugstan_chat.model.dual_encoder import MugStan, MugStanConfig
from mugstan_chat.model.mug import MugConfig
from mugstan_chat.engine.selection import cover, rank
from mugstan_chat.model.stan import StanConfig
from mugstan_chat.synthetic.render import COLOURS, SHAPES, Canvas, shape_mask
from mugstan_chat.video import preprocess_frames, write_video
from mugstan_chat.engine.engine import Engine

T = 4  # frames per clip, in training and in chat
SIZE = 64  # rendered and written frame side; the tower reads 32 px
OBJECTS = [(colour, shape) for colour in COLOURS for shape in SHAPES]
HELD_OUT = [("red", "triangle"), ("green", "square"), ("blue", "circle"), ("yellow", "triangle"),
            ("white", "square"), ("purple", "circle")]  # never in training; every colour once
TRAIN_OBJECTS = [o for o in OBJECTS if o not in HELD_OUT]
# captions and questions the training objects are described with (the held-out objects never are)
TEMPLATES = ["a {} {}", "the {} {}", "when does the {} {} appear?", "where is the {} {}?", "what does the {} {} do?"]
WARM_STEPS, MUG_STEPS = 150, 150  # plain CLIP, then the Mug head
FPS, SEGMENT_FRAMES = 8, 16  # 2 s per segment
CANDIDATES = 12  # two per segment: chance of picking inside the right segment is 2/12
SHORT = GenerationSettings(max_new_tokens=4)


def render(obj, rng: np.random.Generator, frames: int) -> np.ndarray:
    """(frames, SIZE, SIZE, 3) uint8: one object drifting over a dark background."""
    colour, shape = obj
    canvas = Canvas(np.broadcast_to(np.array((30.0, 30.0, 30.0)), (SIZE, SIZE, 3)), frames)
    r = SIZE * rng.uniform(0.15, 0.25)
    x0, y0 = rng.uniform(r + 2, SIZE - r - 2, 2)
    dx, dy = rng.uniform(-6, 6, 2)
    for i in range(frames):
        canvas.paint(i, shape_mask(shape, SIZE, x0 + dx * i / frames, y0 + dy * i / frames, r), COLOURS[colour])
    return canvas.finish()


def _train() -> MugStan:
    config = MugStanConfig(backbone=tiny_backbone_config(layers=DemoSizes.vision_layers),
                           stan=StanConfig(num_layers=2, fuse_layer=-2, drop_path=0.0),
                           mug=MugConfig(mode="frame-token"), context_length=16)
    torch.manual_seed(0)
    model = MugStan(config)
    model.text.text_model.embeddings.token_embedding.weight.requires_grad_(False)  # random word vectors suffice
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4, weight_decay=0.01)
    tokenizer, rng = model.build_tokenizer(), np.random.default_rng(0)
    warm = MugConfig(mode="mean")
    for step in range(WARM_STEPS + MUG_STEPS):  # one batch = every training object once (no false negatives)
        video = torch.stack([preprocess_frames(render(o, rng, T), size=32, resize_to=32) for o in TRAIN_OBJECTS])
        text = tokenizer([TEMPLATES[rng.integers(len(TEMPLATES))].format(*o) for o in TRAIN_OBJECTS])
        frames, feats = model(video, text.input_ids, text.attention_mask)
        loss = mug_contrastive_loss(frames, feats.tokens, feats.mask, feats.pooled,
                                    config=warm if step < WARM_STEPS else config.mug)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def _export(model: MugStan, root) -> tuple[str, str]:
    """(LLaVA directory, branch directory): the trained CLIP saved, the branch exported naming it,
    LLaVA's tower given the trained vision weights."""
    from transformers import CLIPConfig, CLIPModel

    clip = CLIPModel(CLIPConfig(**model.config.backbone.model_config))
    clip.vision_model.load_state_dict(model.vision.vision_model.state_dict())
    clip.visual_projection.load_state_dict(model.vision.projection.state_dict())
    clip.text_model.load_state_dict(model.text.text_model.state_dict())
    clip.text_projection.load_state_dict(model.text.projection.state_dict())
    clip.save_pretrained(root / "clip")
    branch_config = MugStanConfig(backbone=BackboneConfig(family="hf", name=str(root / "clip")),
                                  stan=model.config.stan, mug=model.config.mug, freeze_backbone=True,
                                  context_length=model.config.context_length)
    branch = MugStan(branch_config)
    branch.stan.load_state_dict(model.stan.state_dict())
    branch.save_pretrained(root / "branch")
    llava, processor = build_demo_llava(0)
    llava.model.vision_tower.load_state_dict(model.vision.vision_model.state_dict())
    llava.save_pretrained(root / "llava")
    processor.save_pretrained(root / "llava")
    return str(root / "llava"), str(root / "branch")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster than two fighting over them
    try:
        started = time.perf_counter()
        model = _train()
        print(f"\ntiny dual encoder: {WARM_STEPS + MUG_STEPS} steps in {time.perf_counter() - started:.1f} s")
        llava, branch = _export(model, tmp_path_factory.mktemp("selection"))
        yield Engine(load_chat_model(model=llava, stan=branch, device="cpu", frames=T))  # one retriever for the file
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def long_videos(tmp_path_factory):
    """Three videos of six 2 s segments, each a held-out object in a fresh order and rendering."""
    root = tmp_path_factory.mktemp("long")
    rng = np.random.default_rng(7)
    videos = []
    for v in range(3):
        order = [HELD_OUT[i] for i in rng.permutation(len(HELD_OUT))]
        frames = np.concatenate([render(obj, rng, SEGMENT_FRAMES) for obj in order])
        path = root / f"long{v}.mp4"
        write_video(path, list(frames), fps=FPS, options={"crf": "12"})
        videos.append((str(path), order))
    return videos


def _segment_of(seconds: float) -> int:
    return int(round(seconds * FPS)) // SEGMENT_FRAMES


def _binomial_threshold(trials: int, chance: float, alpha: float = 1e-3) -> int:
    """Smallest k with P(Binomial(trials, chance) >= k) < alpha."""
    for k in range(trials + 1):
        tail = sum(math.comb(trials, j) * chance**j * (1 - chance) ** (trials - j) for j in range(k, trials + 1))
        if tail < alpha:
            return k
    return trials + 1


def test_asking_about_an_object_selects_its_segment(trained, long_videos):
    """18 questions (3 videos x 6 objects) about held-out objects; K = 1 of M = 12 candidates.

    Chance of choosing a candidate inside the right segment is 2/12. "Clearly above chance" is
    derived from the numbers: at least the k hits that chance reaches with probability below
    1e-3 (binomial tail; k = 10 of 18 here; the fixed seeds give 17). The selection must also carry the clip's time.
    """
    cache = FeatureCache(64 * 2**20)
    hits, trials = 0, 0
    for path, order in long_videos:
        for target, obj in enumerate(order):
            session = ChatSession(trained, path, frames=T, select=1, candidates=CANDIDATES, generation=SHORT,
                                  feature_cache=cache, prepare=False)
            session.ask(f"when does the {obj[0]} {obj[1]} appear?")
            (span,) = session.clip_spans
            chosen = session.selection.chosen[0]
            assert (span.start, span.end) == session.selection.times[chosen] and span.candidate == chosen
            assert f"Clip 1 (" in session.prompt_text("again")
            hits += _segment_of(span.start) == _segment_of(span.end) == target
            trials += 1
    needed = _binomial_threshold(trials, 2 / CANDIDATES)
    print(f"\nselection accuracy: {hits}/{trials} (chance {2 / CANDIDATES:.3f}; needed {needed})")
    assert hits >= needed


def test_selection_is_a_pure_function_and_shows_clips_in_time_order(trained, long_videos):
    path, order = long_videos[0]
    question = f"what does the {order[4][0]} {order[4][1]} do after the {order[1][0]} {order[1][1]}?"
    chosen = []
    for _ in range(2):  # separate sessions, separate caches: nothing shared but the inputs
        session = ChatSession(trained, path, frames=T, select=3, candidates=CANDIDATES, generation=SHORT)
        session.ask(question)
        chosen.append((session.selection.chosen, session.selection.scores))
        starts = [s.start for s in session.clip_spans]
        assert starts == sorted(starts) and [s.number for s in session.clip_spans] == [1, 2, 3]
    assert chosen[0] == chosen[1]
    assert session.selection.tokens_saved == (CANDIDATES - 3) * session.tokens_per_image


def test_ties_break_by_the_earlier_start():
    times = [(4.0, 5.0), (0.0, 1.0), (2.0, 3.0), (6.0, 7.0)]
    assert rank([0.5, 0.5, 0.1, 0.5], times, 2) == [1, 0]  # 0.5 three times: the two earliest, in time order
    assert rank([0.1, 0.2, 0.9, 0.3], times, 2) == [2, 3]


def test_a_follow_up_re_ranks_without_the_tower(trained, long_videos):
    """The candidates are embedded once; later questions only score them (counted)."""
    path, order = long_videos[1]
    session = ChatSession(trained, path, frames=T, select=1, candidates=CANDIDATES, generation=SHORT, prepare=False)
    retriever, tower = trained.retriever(), trained.model.tower
    before = retriever.encodes
    session.ask(f"where is the {order[0][0]} {order[0][1]}?")
    assert retriever.encodes - before == CANDIDATES and session.selection.embed_ms > 0
    first = session.selection.chosen
    encodes, calls = retriever.encodes, tower.calls
    session.ask(f"where is the {order[5][0]} {order[5][1]}?")  # another object: other clips
    assert retriever.encodes == encodes  # re-ranked on the cached candidate embeddings
    assert session.selection.cached and session.selection.embed_ms == 0
    assert session.selection.chosen != first and tower.calls == calls + 1  # only the chosen clip for the chat
    session.ask(f"where is the {order[0][0]} {order[0][1]} again?")
    calls = tower.calls
    session.ask(f"where is the {order[0][0]} {order[0][1]}?")  # chosen before: its chat features are cached too
    assert retriever.encodes == encodes and tower.calls == calls


def test_a_branch_without_retrieval_falls_back_to_uniform_clips(tmp_path, long_videos):
    """The demo branch's export records no text tower: one line says so, K uniform clips are shown."""
    branch = save_demo_branch(tmp_path / "branch")
    chat_model = load_chat_model(demo=True, stan=branch, device="cpu", frames=T)
    session = ChatSession(Engine(chat_model), long_videos[0][0], frames=T, select=2, candidates=8, generation=SHORT)
    session.ask("what happens?")
    assert session.selection is None and len(session.clip_spans) == 2
    assert "\n" not in session.selection_notice and "names no CLIP text tower" in session.selection_notice
    assert "uniform" in session.selection_notice


# ------------------------------------------------------------------------------ coverage (--selection coverage)


def test_cover_is_the_best_clip_for_one_and_uniform_for_equal_scores():
    times = [(2.0 * i, 2.0 * i + 1) for i in range(12)]
    rng = np.random.default_rng(3)
    for _ in range(50):
        scores = rng.normal(size=12).tolist()
        assert cover(scores, times, 1) == rank(scores, times, 1)  # one clip: the best one
        for keep in range(1, 13):
            chosen = cover(scores, times, keep)
            assert len(set(chosen)) == keep and chosen == sorted(chosen)  # K distinct, in temporal order
            assert max(range(12), key=scores.__getitem__) in chosen  # the best match is always shown
    assert cover([0.5] * 12, times, 4) == [1, 4, 7, 10]  # no preference: the middle of four equal stretches
    assert cover([0.5] * 12, times, 12) == list(range(12))


def test_cover_reaches_a_second_moment_that_top_k_misses():
    """Two moments far apart, each two candidates long, the second a little weaker; and a long one against a
    short one, where the picks follow each moment's share of the relevance (BOLT's density)."""
    times = [(float(i), i + 1.0) for i in range(12)]
    scores = [0.1, 0.9, 0.92, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.88, 0.87, 0.1]
    assert rank(scores, times, 2) == [1, 2]  # both from the first moment
    assert cover(scores, times, 2) == [2, 9]  # the best of each
    long_and_short = [0.9, 0.92, 0.91, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.85, 0.1]
    assert cover(long_and_short, times, 2) == [1, 2]  # 76% of the relevance: both bins start in the long one
    assert cover(long_and_short, times, 4) == [0, 1, 2, 10]  # with more clips the short one gets its share


def _recurring_video(root, rng) -> tuple[str, tuple]:
    """Six 2 s segments; one held-out object in the first and the last, others between."""
    recurring, others = HELD_OUT[0], HELD_OUT[1:5]
    order = [recurring, *others, recurring]
    frames = np.concatenate([render(obj, rng, SEGMENT_FRAMES) for obj in order])
    path = root / "recurring.mp4"
    write_video(path, list(frames), fps=FPS, options={"crf": "12"})
    return str(path), recurring


def test_coverage_shows_both_moments_of_a_recurring_object(trained, tmp_path):
    path, obj = _recurring_video(tmp_path, np.random.default_rng(11))
    question = f"when does the {obj[0]} {obj[1]} appear?"
    segments = {}
    for strategy in ("topk", "coverage"):
        session = ChatSession(trained, path, frames=T, select=2, candidates=CANDIDATES, generation=SHORT,
                              selection_strategy=strategy, prepare=False)
        session.ask(question)
        assert session.selection.strategy == strategy and session.summary()["selection"]["strategy"] == strategy
        segments[strategy] = sorted(_segment_of(span.start) for span in session.clip_spans)
    print(f"\nrecurring object, K=2 of {CANDIDATES}: segments shown topk {segments['topk']}, "
          f"coverage {segments['coverage']}")
    assert segments["coverage"] == [0, 5]


def test_coverage_finds_as_many_asked_objects_as_top_k(trained, long_videos):
    """Questions about two held-out objects at once, K = 2 of M = 12: the objects whose segment a shown clip
    lies in, counted for both strategies over every pair in every long video (3 x 15 questions, 90 objects)."""
    cache = FeatureCache(64 * 2**20)
    found = {"topk": 0, "coverage": 0}
    asked = uniform = 0
    for path, order in long_videos:
        plain = ChatSession(trained, path, frames=T, clips=2, generation=SHORT)
        plain_shown = {_segment_of(s.start) for s in plain.clip_spans}  # two uniform clips, for the record
        for a in range(len(order)):
            for b in range(a + 1, len(order)):
                question = (f"what do the {order[a][0]} {order[a][1]} and the {order[b][0]} {order[b][1]} do?")
                asked += 2
                uniform += (a in plain_shown) + (b in plain_shown)
                for strategy in found:
                    session = ChatSession(trained, path, frames=T, select=2, candidates=CANDIDATES,
                                          selection_strategy=strategy, generation=SHORT, feature_cache=cache,
                                          prepare=False)
                    session.select_clips(question)
                    shown = {_segment_of(s.start) for s in session.clip_spans}
                    found[strategy] += (a in shown) + (b in shown)
    print(f"\nasked objects found with K=2: topk {found['topk']}/{asked}, coverage {found['coverage']}/{asked}, "
          f"2 uniform clips {uniform}/{asked}")
    assert found["coverage"] >= found["topk"]


# ------------------------------------------------------------------------------ the coarse pass (--shortlist S)


def test_a_coarse_pass_finds_the_segments_at_a_fraction_of_the_frames(trained, long_videos):
    """K = 1 of M = 12 with S = 3: every candidate scored on its middle frame, three embedded in full.

    Held to the same binomial bound as the full pass (same chance, same 18 questions). The frames through the
    tower are counted: a video's first question costs M one-frame candidates plus S x T (12 + 12 = 24 frames
    against M x T = 48 for the full pass); later questions pay T frames for each shortlisted candidate new to
    the video (each is cached), so a conversation that asks about every part of a video ends near the full
    pass's cost (printed).
    """
    shortlist = 3
    cache = FeatureCache(64 * 2**20)
    retriever = trained.retriever()
    hits = trials = 0
    total_before = retriever.frames_encoded
    for path, order in long_videos:
        for target, obj in enumerate(order):
            before = retriever.frames_encoded
            session = ChatSession(trained, path, frames=T, select=1, candidates=CANDIDATES, shortlist=shortlist,
                                  generation=SHORT, feature_cache=cache, prepare=False)
            selection = session.select_clips(f"when does the {obj[0]} {obj[1]} appear?")
            if target == 0:  # the video's first question
                assert retriever.frames_encoded - before == CANDIDATES + shortlist * T < CANDIDATES * T
            assert len(selection.shortlist) == shortlist and set(selection.chosen) <= set(selection.shortlist)
            assert len(selection.scores) == CANDIDATES and len(selection.shortlist_scores) == shortlist
            (span,) = session.clip_spans
            hits += _segment_of(span.start) == _segment_of(span.end) == target
            trials += 1
    spent = retriever.frames_encoded - total_before
    needed = _binomial_threshold(trials, 2 / CANDIDATES)
    print(f"\ncoarse pass (S={shortlist}): {hits}/{trials} (needed {needed}); first question per video "
          f"{CANDIDATES + shortlist * T} frames against {CANDIDATES * T}; all 6 questions per video {spent} frames "
          f"against {len(long_videos) * CANDIDATES * T} for the full pass")
    assert hits >= needed


def test_a_shortlist_repeats_no_tower_work_for_a_repeated_question(trained, long_videos):
    path, order = long_videos[2]
    session = ChatSession(trained, path, frames=T, select=2, candidates=CANDIDATES, shortlist=4, generation=SHORT,
                          prepare=False)
    retriever = trained.retriever()
    question = f"where is the {order[3][0]} {order[3][1]}?"
    before = retriever.frames_encoded
    first = session.select_clips(question)
    assert retriever.frames_encoded - before == CANDIDATES + 4 * T  # one frame each, then the four in full
    assert first.embed_ms > 0 and not first.cached
    again = ChatSession(trained, path, frames=T, select=2, candidates=CANDIDATES, shortlist=4, generation=SHORT,
                        feature_cache=session.feature_cache, prepare=False).select_clips(question)
    assert retriever.frames_encoded - before == CANDIDATES + 4 * T  # all from the cache
    assert again.cached and again.embed_ms == 0 and again.chosen == first.chosen
    assert again.to_dict()["shortlist"] == first.shortlist


@pytest.mark.parametrize("shortlist", [1, 12, 13])
def test_a_shortlist_lies_between_k_and_m(trained, long_videos, shortlist):
    with pytest.raises(ValueError, match="K <= S < M"):
        ChatSession(trained, long_videos[0][0], frames=T, select=2, candidates=CANDIDATES, shortlist=shortlist,
                    prepare=False)


def _cover_from_the_equations(scores, keep, sharpen=1.0):
    """docs/design.md 4c step 4, written out: r_i, bins by the middle of each candidate's mass, best per bin,
    empty bins' picks to the best not yet shown (candidates already in temporal order)."""
    low, high = min(scores), max(scores)
    r = [1.0] * len(scores) if high == low else [((s - low) / (high - low)) ** sharpen for s in scores]
    total = sum(r)
    bins = {}
    running = 0.0
    for i, weight in enumerate(r):
        b = min(keep - 1, int(keep * (running + weight / 2) / total))
        running += weight
        bins.setdefault(b, []).append(i)
    chosen = set()
    for members in bins.values():
        centre = (len(members) - 1) / 2
        best = max(scores[i] for i in members)
        ties = [j for j, i in enumerate(members) if scores[i] == best]
        chosen.add(members[min(ties, key=lambda j: (abs(j - centre), j))])
    for i in sorted(range(len(scores)), key=lambda i: (-scores[i], i)):
        if len(chosen) == keep:
            break
        chosen.add(i)
    return sorted(chosen)


def test_cover_matches_its_equations():
    rng = np.random.default_rng(5)
    times = [(float(i), i + 0.5) for i in range(20)]
    for _ in range(200):
        # continuous scores: no candidate's mass middle falls on a bin boundary, where the order of the
        # floating-point operations could decide the bin (ties are tested with equal scores above)
        scores = rng.normal(size=20).tolist()
        keep = int(rng.integers(1, 9))
        assert cover(scores, times, keep) == _cover_from_the_equations(scores, keep)
    tied = [0.5] * 7 + [0.9, 0.9] + [0.5] * 11  # a tie of the two best: the one nearer its bin's middle
    assert cover(tied, times, 3) == _cover_from_the_equations(tied, 3)
