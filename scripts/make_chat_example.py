"""Write configs/data/debian-synopsis/chat.jsonl: the first 400 training rows as
OpenAI-style chat conversations, for configs/chat-example.yaml."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "configs" / "data" / "debian-synopsis"

with open(ROOT / "train.jsonl") as src, open(ROOT / "chat.jsonl", "w") as dst:
    for i, line in enumerate(src):
        if i == 400:
            break
        row = json.loads(line)
        messages = [
            {"role": "system", "content": "You write one-line Debian package synopses."},
            {"role": "user", "content": f"Package: {row['package']}\n{row['description']}"},
            {"role": "assistant", "content": row["synopsis"]},
        ]
        dst.write(json.dumps({"messages": messages}) + "\n")
