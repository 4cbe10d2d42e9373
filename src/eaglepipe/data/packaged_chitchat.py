"""A `kind: packaged_chitchat` source: the Chit Chat Challenge conversations (PyPI package `chitchat-dataset`, MIT).

`chitchat_dataset/dataset.json` maps a conversation id to `{"messages": [[{text, sender, timestamp}, ...], ...]}`:
casual English chats between two people, their messages grouped by speaker. Each conversation becomes
`{"id", "messages"}`: the consecutive messages of one sender are one turn (joined by newlines), and the turns
alternate user, assistant, user, ... from the first speaker. A conversation whose second speaker never answers is
one user turn, which normalize rejects (no assistant turn).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .sources import SourceRecords, package_dir

CHITCHAT_INSTALL = "chitchat-dataset==0.9.0"
ROLES = ("user", "assistant")


def chitchat_path() -> Path:
    """`dataset.json` of the installed package."""
    path = package_dir("chitchat_dataset", CHITCHAT_INSTALL) / "dataset.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed chitchat-dataset package; "
                                f"install {CHITCHAT_INSTALL}")
    return path


def chitchat_turns(conversation: dict[str, Any]) -> list[dict[str, str]]:
    """One conversation's messages as alternating user/assistant turns, one per run of a single sender."""
    runs: list[tuple[str, list[str]]] = []
    for group in conversation["messages"]:
        for message in group:
            if runs and runs[-1][0] == message["sender"]:
                runs[-1][1].append(message["text"])
            else:
                runs.append((message["sender"], [message["text"]]))
    return [{"role": ROLES[i % 2], "content": "\n".join(texts)} for i, (_, texts) in enumerate(runs)]


def read_chitchat(name: str) -> SourceRecords:
    """Every conversation of the package, in file order."""
    path = chitchat_path()
    data = json.loads(path.read_text(encoding="utf-8"))
    out = SourceRecords(name)
    for cid, conversation in data.items():
        try:
            messages = chitchat_turns(conversation)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: conversation {cid} is not in the {CHITCHAT_INSTALL} layout "
                             f"(messages: lists of {{text, sender, timestamp}}): {type(e).__name__}: {e}") from None
        out.records.append(json.dumps({"id": cid, "messages": messages}, ensure_ascii=False))
    out.files.append({"path": str(path), "records": len(out.records)})
    return out
