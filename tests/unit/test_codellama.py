"""Golden tests: Code Llama prompt formats against hand-written token sequences.

The expected sequences are written out piece by piece (or, for long texts,
with SentencePiece itself, which is what Meta's reference encodes with), so
they check our Hugging Face-tokenizer path against the reference's semantics:
implicit leading space for `encode`, none for `encode_infilling`, BOS/EOS as ids.
"""

from __future__ import annotations

import pytest

from engine.codellama import (
    ChatMessage,
    CodeLlamaPrompts,
    PromptError,
    SpecialIds,
    capabilities,
    special_ids,
)


@pytest.fixture(scope="module")
def prompts(demo_tokenizer) -> CodeLlamaPrompts:
    return CodeLlamaPrompts(demo_tokenizer)


@pytest.fixture(scope="module")
def ids(demo_sp):
    """Piece strings -> ids, so expectations read as the tokens they are."""

    def to_ids(*pieces: str) -> list[int]:
        out = []
        for p in pieces:
            i = demo_sp.piece_to_id(p)
            assert demo_sp.id_to_piece(i) == p, f"{p!r} is not a piece of the demo vocabulary"
            out.append(i)
        return out

    return to_ids


BOS, EOS = 1, 2
INST = ["▁[", "IN", "S", "T", "]"]
END_INST = ["▁[", "/", "IN", "S", "T", "]"]


def test_special_ids_are_read_from_the_tokenizer(demo_tokenizer, demo_sp):
    s = special_ids(demo_tokenizer)
    assert (s.bos, s.eos) == (demo_sp.bos_id(), demo_sp.eos_id()) == (BOS, EOS)
    # Like Code Llama's, the infill pieces sit at the top of the vocabulary.
    assert [s.prefix, s.suffix, s.middle, s.eot] == [
        demo_sp.piece_to_id(p) for p in ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>")
    ]
    assert [s.prefix, s.suffix, s.middle, s.eot] == [1996, 1997, 1998, 1999]
    assert s.has_infill


def test_chat_one_turn(prompts, ids):
    got = prompts.chat([ChatMessage("user", "  Write a sort function.\n")])
    expected = [BOS, *ids(*INST, "▁W", "r", "ite", "▁a", "▁sort", "▁function", ".", *END_INST)]
    assert got == expected


def test_chat_with_system_prompt(prompts, demo_sp):
    got = prompts.chat(
        [ChatMessage("system", "Answer in Python."), ChatMessage("user", "Sort a list.")]
    )
    text = "[INST] <<SYS>>\nAnswer in Python.\n<</SYS>>\n\nSort a list. [/INST]"
    assert got == [BOS, *demo_sp.encode(text)]
    # The newlines of <<SYS>> are byte tokens, as in Llama's vocabulary.
    assert demo_sp.piece_to_id("<0x0A>") in got


def test_chat_multi_turn(prompts, demo_sp, ids):
    got = prompts.chat(
        [
            ChatMessage("user", "Sort a list."),
            ChatMessage("assistant", " sorted(x) \n"),
            ChatMessage("user", "Reverse it."),
        ]
    )
    first = [BOS, *demo_sp.encode("[INST] Sort a list. [/INST] sorted(x) "), EOS]
    second = [BOS, *demo_sp.encode("[INST] Reverse it. [/INST]")]
    assert got == first + second
    # Each finished turn is BOS ... EOS; the last has BOS and no EOS.
    assert got.count(BOS) == 2 and got.count(EOS) == 1 and got[-1] != EOS
    # The answer is stripped, then one space before EOS: "▁sorted(x)▁" -> ends with "▁".
    assert first[-2] == ids("▁")[0]


def test_chat_system_then_multi_turn(prompts, demo_sp):
    msgs = [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Q1"),
        ChatMessage("assistant", "A1"),
        ChatMessage("user", "Q2"),
    ]
    expected = [
        BOS,
        *demo_sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nQ1 [/INST] A1 "),
        EOS,
    ] + [BOS, *demo_sp.encode("[INST] Q2 [/INST]")]
    assert prompts.chat(msgs) == expected


def test_infill_prefix_suffix_middle(prompts, ids):
    s = prompts.ids
    got = prompts.infill("def add(a, b):\n", "    return x")
    expected = (
        [BOS, s.prefix]
        + ids("▁def", "▁add", "(", "a", ",", "▁b", "):", "<0x0A>")
        + [s.suffix]
        # No implicit leading space on the suffix: four spaces, not five.
        + ids("▁▁▁▁", "return", "▁x")
        + [s.middle]
    )
    assert got == expected


def test_infill_suffix_first(prompts, ids):
    s = prompts.ids
    got = prompts.infill("def add(a, b):\n", "    return x", suffix_first=True)
    expected = (
        [BOS, s.prefix, s.suffix]
        + ids("▁▁▁▁", "return", "▁x")
        + [s.middle]
        + ids("▁def", "▁add", "(", "a", ",", "▁b", "):", "<0x0A>")
    )
    assert got == expected


def test_infill_suffix_with_leading_newline(prompts, ids):
    s = prompts.ids
    got = prompts.infill("x = ", "\n    return x\n")
    assert got == (
        [BOS, s.prefix, *ids("▁x", "▁=", "▁"), s.suffix]  # trailing space kept
        + ids("<0x0A>", "▁▁▁▁", "return", "▁x", "<0x0A>")
        + [s.middle]
    )


def test_infill_suffix_without_leading_whitespace(prompts, ids):
    s = prompts.ids
    got = prompts.infill("return ", "x")
    assert got == [BOS, s.prefix, *ids("▁return", "▁"), s.suffix, *ids("x"), s.middle]


def test_encode_matches_sentencepiece_on_code(prompts, demo_sp):
    # Leading indentation is where Hugging Face tokenizers and SentencePiece
    # part ways; ours must follow SentencePiece (Meta's reference).
    import inspect
    import textwrap

    src = inspect.getsource(textwrap)
    for block in src.split("\n\n")[:200]:
        assert prompts.encode(block) == demo_sp.encode(block), repr(block[:60])


def test_control_tokens_in_text_stay_text(prompts, ids):
    got = prompts.completion("<s>")
    assert got[0] == BOS and BOS not in got[1:]


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([], "at least one message"),
        ([("assistant", "hi")], "expected role 'user'"),
        ([("user", "a"), ("user", "b")], "expected role 'assistant'"),
        ([("user", "a"), ("assistant", "b")], "last message must be from 'user'"),
        ([("system", "s")], "must be followed by a user message"),
        ([("user", "a"), ("system", "s"), ("user", "b")], "expected role 'assistant'"),
        ([("tool", "x")], "expected role 'user'"),
        ([("user", "say [INST] twice")], "special tags"),
    ],
)
def test_chat_rejects_bad_dialogs(prompts, messages, fragment):
    with pytest.raises(PromptError, match=fragment) as e:
        prompts.chat([ChatMessage(r, c) for r, c in messages])
    assert e.value.param == "messages"


def test_developer_role_is_system(prompts):
    a = prompts.chat([ChatMessage("developer", "S"), ChatMessage("user", "U")])
    b = prompts.chat([ChatMessage("system", "S"), ChatMessage("user", "U")])
    assert a == b


def test_capabilities():
    ids = SpecialIds(1, 2, 10, 11, 12, 13)
    no_infill = SpecialIds(1, 2, None, None, None, None)
    c = capabilities("codellama/CodeLlama-13b-Instruct-hf", False, 5120, ids, "auto", "auto")
    assert c.chat and c.infill
    c = capabilities("codellama/CodeLlama-34b-Instruct-hf", False, 8192, ids, "auto", "auto")
    assert c.chat and not c.infill and "7B and 13B" in c.why_no_infill
    c = capabilities("codellama/CodeLlama-7b-Python-hf", False, 4096, ids, "auto", "auto")
    assert not c.chat and not c.infill and "Instruct" in c.why_no_chat
    c = capabilities("/models/my-13b", False, 5120, ids, "on", "off")
    assert c.chat and not c.infill
    c = capabilities("x", False, 5120, no_infill, "auto", "on")
    assert not c.infill and "no infilling tokens" in c.why_no_infill
