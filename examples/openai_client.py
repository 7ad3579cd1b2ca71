"""An app that talks to `edgetok serve` with the official openai client: the model's id, a whole
answer, a streamed one, and a conversation whose second turn reuses the first turn's prompt.

    edgetok serve smollm2 --api-key-file key.txt &
    python examples/openai_client.py --base-url http://127.0.0.1:8080/v1 --api-key-file key.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import openai


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--api-key-file", type=Path, default=None, help="the server's key (none if it has none)")
    args = ap.parse_args()
    key = args.api_key_file.read_text().strip() if args.api_key_file else "none"
    client = openai.OpenAI(base_url=args.base_url, api_key=key)
    model = client.models.list().data[0].id
    print(f"model: {model}")

    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    answer = client.chat.completions.create(model=model, messages=messages, max_tokens=32, temperature=0)
    print(f"answer: {answer.choices[0].message.content!r} [{answer.choices[0].finish_reason}, "
          f"{answer.usage.completion_tokens} tokens]")

    print("streamed: ", end="")
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=32, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()

    # the next turn: the server's kept cache already holds the first turn's prompt and answer
    messages += [{"role": "assistant", "content": answer.choices[0].message.content},
                 {"role": "user", "content": "And one more?"}]
    follow = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
    print(f"second turn: {follow.choices[0].message.content!r}")


if __name__ == "__main__":
    main()
