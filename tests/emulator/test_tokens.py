"""The emulator's tokenizer: 4-character pieces, prefix-stable across chat turns."""

from __future__ import annotations

from typing import Any

from daemon.emulator import tokens as tok

TURNS: list[dict[str, Any]] = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Why is the sky blue?"},
    {"role": "assistant", "content": "Air scatters short waves."},
    {"role": "user", "content": "And at sunset?"},
]


def test_segments_are_cut_into_pieces_of_four_characters() -> None:
    assert tok.segment("user", "hi") == "user\nhi\n"
    ids = tok.encode(["abcdefghij", "xy"])
    assert ids == [tok.token_id(p) for p in ("abcd", "efgh", "ij", "xy")]
    assert all(isinstance(i, int) and 0 <= i < 2**31 for i in ids)
    assert tok.token_id("abcd") == tok.token_id("abcd") != tok.token_id("abce")


def test_the_tokens_of_k_messages_prefix_those_of_k_plus_one() -> None:
    for k in range(len(TURNS)):
        shorter, longer = tok.chat(TURNS[:k]), tok.chat(TURNS[: k + 1])
        assert longer[: len(shorter)] == shorter and len(longer) > len(shorter)
    reply = TURNS[2]["content"]
    assert tok.chat(TURNS[:3]) == tok.chat(TURNS[:2]) + tok.reply(reply)


def test_generate_is_context_then_system_then_prompt() -> None:
    system_and_user = tok.chat(TURNS[:2])
    assert tok.generate("Why is the sky blue?", "Answer briefly.") == system_and_user
    assert tok.generate("x", context=[7, 8]) == [7, 8, *tok.generate("x")]
    assert tok.generate("x", system="", context="junk") == tok.generate("x")
    assert tok.generate("x", context=[1, True, "2"]) == [1, *tok.generate("x")]


def test_images_and_content_parts() -> None:
    def with_image(data: str) -> list[int]:
        return tok.chat([{"role": "user", "content": "look", "images": [data]}])

    assert with_image("aGVsbG8=") == with_image("aGVsbG8=") != with_image("d29ybGQ=")
    assert tok.content_text({"content": "look", "images": ["x"]}).startswith("look [img ")
    parts = {
        "role": "user",
        "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "data:x"}},
        ],
    }
    assert tok.chat([parts]) == tok.chat(
        [{"role": "user", "content": "look", "images": ["data:x"]}]
    )
    assert tok.chat("not a list") == [] and tok.chat([None, 3]) == []
    assert tok.chat([{"content": None}]) == tok.encode(["user\n\n"])


def test_common_prefix() -> None:
    assert tok.common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert tok.common_prefix([], [1]) == 0
    assert tok.common_prefix([1, 2], [1, 2, 3]) == 2
