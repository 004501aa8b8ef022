"""Front ends talk to the engine's public surface only: none drives a conversation's lifecycle or writes its fields.

The front ends (``mugstan_chat/entrypoints/``, ``batch/``, ``evaluation/``) open conversations with
:meth:`mugstan_chat.engine.engine.Engine.open` and then only ask and read. Read from their source with
``ast``: no import of the session class, no call of a lifecycle step, no assignment to a session's
fields, no reach into ``_session``. The checker is tried on a snippet that breaks each rule, so it
cannot pass by finding nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRONT_ENDS = ("mugstan_chat/entrypoints", "mugstan_chat/batch", "mugstan_chat/evaluation")
LIFECYCLE = {"prepare", "prepare_candidates", "resolve_clips", "select_clips", "attach_features", "check_fits",
             "session_features", "loglikelihood", "undo_last", "drop_prefix_cache"}
FIELDS = {"history", "generation", "feature_cache", "content_hash", "video_path", "turns", "clips", "select",
          "selection", "kv", "cache_budget"}


def violations(source: str, name: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.endswith("engine.conversation"):
            found.append(f"{name}:{node.lineno} imports {node.module}")
        elif isinstance(node, ast.Import) and any(a.name.endswith("engine.conversation") for a in node.names):
            found.append(f"{name}:{node.lineno} imports the session module")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LIFECYCLE:
            found.append(f"{name}:{node.lineno} calls .{node.func.attr}()")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr in FIELDS and not (
                        isinstance(target.value, ast.Name) and target.value.id == "self"):
                    found.append(f"{name}:{node.lineno} writes .{target.attr}")
        elif isinstance(node, ast.Attribute) and node.attr == "_session":
            found.append(f"{name}:{node.lineno} reaches into ._session")
        elif isinstance(node, ast.Name) and node.id == "ChatSession":
            found.append(f"{name}:{node.lineno} names ChatSession")
    return found


def front_end_files():
    for folder in FRONT_ENDS:
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_the_checker_finds_each_kind_of_breach():
    snippet = ("from mugstan_chat.engine.conversation import ChatSession\n"
               "session = ChatSession(engine, 'v.mp4')\n"
               "session.prepare()\nsession.select_clips('q')\n"
               "session.history = []\nchat.generation = settings\n"
               "conversation._session.ask('q')\n")
    found = violations(snippet, "snippet")
    for kind in ("imports", "names ChatSession", ".prepare()", ".select_clips()", "writes .history",
                 "writes .generation", "._session"):
        assert any(kind in line for line in found), (kind, found)


def test_front_ends_use_only_the_engine_surface():
    files = list(front_end_files())
    assert len(files) > 20, "the front ends' folders moved: update FRONT_ENDS"
    found = [line for path in files for line in violations(path.read_text(encoding="utf-8"),
                                                             str(path.relative_to(ROOT)))]
    assert not found, "front ends driving a session themselves:\n" + "\n".join(found)
