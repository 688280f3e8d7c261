"""Prefix chains read from request bodies: turns of a conversation share their prefix."""

from __future__ import annotations

from daemon.gateway.routing.prompts import read_prompt

M = "llama3.1:8b"
SYSTEM = {"role": "system", "content": "You are terse. " * 50}


def chat(*messages: dict) -> dict:
    return {"model": M, "messages": list(messages)}


def test_the_next_turn_extends_the_chain_of_the_last() -> None:
    turn1 = [SYSTEM, {"role": "user", "content": "Summarise this: " + "text " * 2000}]
    turn2 = [
        *turn1,
        {"role": "assistant", "content": "whatever the node said"},
        {"role": "user", "content": "shorter"},
    ]
    one = read_prompt("/api/chat", chat(*turn1), M)
    two = read_prompt("/api/chat", chat(*turn2), M)
    assert two.hashes[:2] == one.hashes
    assert one.conversation == two.conversation == one.hashes[1]
    assert one.total_tokens > 2500
    assert two.total_tokens > one.total_tokens


def test_the_reply_hashes_by_position_not_by_text() -> None:
    # olmd never parses streamed chunks: the node's reply, sent back, matches by place.
    user = {"role": "user", "content": "hi"}
    a = read_prompt("/api/chat", chat(user, {"role": "assistant", "content": "one"}), M)
    b = read_prompt("/api/chat", chat(user, {"role": "assistant", "content": "two"}), M)
    assert a.hashes == b.hashes
    c = read_prompt("/api/chat", chat({"role": "user", "content": "ho"}), M)
    assert c.hashes[0] != a.hashes[0]


def test_other_models_and_other_system_prompts_make_other_chains() -> None:
    user = {"role": "user", "content": "hi"}
    assert (
        read_prompt("/api/chat", chat(user), M).hashes
        != read_prompt("/api/chat", chat(user), "mistral:7b").hashes
    )
    other = {"role": "system", "content": "You are verbose."}
    assert (
        read_prompt("/api/chat", chat(SYSTEM, user), M).conversation
        != read_prompt("/api/chat", chat(other, user), M).conversation
    )


def test_openai_content_parts_and_images_count() -> None:
    parts = {"role": "user", "content": [{"type": "text", "text": "x" * 400}]}
    with_image = {
        "role": "user",
        "content": [
            {"type": "text", "text": "x" * 400},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        ],
    }
    p1 = read_prompt("/v1/chat/completions", chat(parts), M)
    p2 = read_prompt("/v1/chat/completions", chat(with_image), M)
    assert p1.total_tokens >= 100
    assert p1.hashes != p2.hashes


def test_a_growing_completion_prompt_shares_its_blocks() -> None:
    first = "line of a document\n" * 100
    one = read_prompt("/api/generate", {"model": M, "prompt": first}, M)
    two = read_prompt("/api/generate", {"model": M, "prompt": first + "and more"}, M)
    full_blocks = len(first) // 256
    assert two.hashes[:full_blocks] == one.hashes[:full_blocks]
    with_context = read_prompt("/api/generate", {"model": M, "prompt": "go", "context": [1, 2]}, M)
    again = read_prompt("/api/generate", {"model": M, "prompt": "on", "context": [1, 2]}, M)
    assert with_context.hashes[0] == again.hashes[0]


def test_bodies_without_a_prompt_have_no_chain() -> None:
    assert read_prompt("/api/chat", {"model": M, "messages": "nonsense"}, M).hashes == ()
    assert read_prompt("/api/embed", {"model": M, "input": "x"}, M).hashes == ()
    assert read_prompt("/api/generate", {"model": M}, M).conversation is None
