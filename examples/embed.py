"""An app that embeds edgetok: one model loaded once, answers streamed as they come, a Stop button
(a cancel token another thread sets), and threads that share the model.

    python examples/embed.py [MODEL]          # MODEL: "smollm2" (default), a folder, a .gguf, an ONNX export
"""

from __future__ import annotations

import sys
import threading

import edgetok


def main(ref: str) -> None:
    model = edgetok.load(ref)
    chat = model.has_chat_template

    # 1. Stream an answer, printing each piece as it is generated.
    print("answer: ", end="")
    with model.stream("Name three colours of the rainbow.", chat=chat, max_new_tokens=32) as stream:
        for piece in stream:
            print(piece, end="", flush=True)
    print(f"\n[{stream.result.finish_reason}, {len(stream.result.tokens)} tokens]")

    # 2. A Stop button: a UI thread sets the event; the generation ends before its next token and
    #    the model is ready for the next call at once.
    stop = threading.Event()
    with model.stream("Tell me a very long story.", chat=chat, max_new_tokens=4000, ignore_eos=True, cancel=stop) as stream:
        for i, _piece in enumerate(stream):
            if i == 4:  # the user presses Stop (the UI thread's handler sets the event)
                button = threading.Thread(target=stop.set)
                button.start()
                button.join()
    print(f"stopped: [{stream.result.finish_reason}, {len(stream.result.tokens)} tokens]")

    # 3. Threads sharing the model: their calls take turns; each gets its own answer, never a mix.
    questions = ["What is 2 + 2?", "Say hello in French.", "Name a planet."]
    alone = {q: model.generate(q, chat=chat, max_new_tokens=12).text for q in questions}
    together: dict[str, str] = {}
    workers = [threading.Thread(target=lambda q=q: together.__setitem__(q, model.generate(q, chat=chat, max_new_tokens=12).text))
               for q in questions]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print("threads: " + ("each got its own answer" if together == alone else "MIXED"))
    if together != alone:
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "smollm2")
