"""Prompt text exactly as the release builds it, answer post-processing and MVBench answer check."""
import pytest

from stllm_engine import prompts as P

Q = "What is the man doing?"


def _release_chat_prompt(question, system):
    # Conversation.copy() + Chat.ask + get_context_emb_sim, re-traced by hand from the release
    message = " ".join(["<Video><ImageHere></Video>", question])
    question = message.split("</Video> ")[1]
    return system + "###Human: " + question + " ###Assistant: "


@pytest.mark.parametrize("system", [None, "", "You are helpful.\n"])
@pytest.mark.parametrize("question", [Q, "  spaced  ", "line1\nline2", "é ###x"])
def test_chat_prompt_matches_release(system, question):
    sys_text = P.CHAT_SYSTEM if system is None else system
    assert P.chat_prompt(question, system) == _release_chat_prompt(question, sys_text)


def test_chat_prompt_exact_text():
    assert P.chat_prompt("Why?", "") == "###Human: Why? ###Assistant: "
    assert P.chat_prompt("Why?").startswith("Carefully watch the video")
    assert P.chat_prompt("Why?").endswith("best addresses the question.\n###Human: Why? ###Assistant: ")


def test_chat_prompt_rejects_non_string():
    with pytest.raises(TypeError, match="question must be a str"):
        P.chat_prompt(None)


def test_mvbench_question_template():
    q = P.mvbench_question("What colour?", ["red", "blue ball", "green"])
    assert q == "Question: What colour?\nOptions:\n(A) red\n(B) blue ball\n(C) green"
    assert P.mvbench_gt(["red", "blue ball"], "blue ball") == "(B) blue ball"
    assert P.mvbench_gt(["red"], "pink") == "(@) pink"  # release: index -1 when absent
    with pytest.raises(ValueError, match="at least one candidate"):
        P.mvbench_question("q", [])


def _release_mvbench_prompt(system, question):
    # infer_mvbench(system_llm=True) + ask + answer(answer_prompt) + get_prompt2, traced by hand
    messages = [["Human", "<Video><VideoHere></Video>\n"],
                ["Human", system + question + "\nOnly give the best option." + "\n"],
                ["Assistant", "Best option:("]]
    ret = system + "###"
    for i, (role, msg) in enumerate(messages):
        ret += role + ": " + msg + ("" if i == len(messages) - 1 else "###")
    return ret.split("<VideoHere>")


@pytest.mark.parametrize("question", ["Question: q\nOptions:\n(A) a\n(B) b", "x"])
def test_mvbench_simple_prompt_is_the_release_prompt_after_the_video(question):
    """``get_context_emb_sim`` (``--ask_simple``, the published test_mvbench.sh) keeps
    ``prompt.split('</Video>\\n')[1]`` of the same conversation and puts the video first."""
    release = "".join(_release_mvbench_prompt(P.MVBENCH_SYSTEM, question)).split("</Video>\n")[1]
    assert P.mvbench_simple_prompt(question) == release
    assert release == ("###Human: " + P.MVBENCH_SYSTEM + question + "\nOnly give the best option.\n"
                       "###Assistant: Best option:(")


@pytest.mark.parametrize("question", ["Question: q\nOptions:\n(A) a\n(B) b", "x"])
def test_mvbench_segments_match_release(question):
    before, after = P.mvbench_prompt_segments(question)
    assert [before, after] == _release_mvbench_prompt(P.MVBENCH_SYSTEM, question)
    assert before.endswith("###Human: <Video>")
    assert after.startswith("</Video>\n###Human: " + P.MVBENCH_SYSTEM)
    assert after.endswith("\nOnly give the best option.\n###Assistant: Best option:(")


@pytest.mark.parametrize("text,want", [
    ("The cat sits.###Human: more", "The cat sits."),
    ("  Assistant: red ball  ", "red ball"),
    ("x Assistant: a Assistant: b###c", "b"),
    ("no markers", "no markers"),
    ("###", ""),
    ("", ""),
    ("line1\nline2\n", "line1\nline2"),
])
def test_postprocess_answer(text, want):
    assert P.postprocess_answer(text) == want


@pytest.mark.parametrize("text,want", [
    ("A) red ball\nBecause it is red.", "(A) red ball"),
    (" B) two###Human", "(B) two"),
    ("", "("),
])
def test_mvbench_postprocess(text, want):
    assert P.mvbench_postprocess(text) == want


@pytest.mark.parametrize("pred,gt,ok", [
    ("(A) red ball", "(A) red ball.", True),
    ("(a)", "(A) Red.", True),
    ("(B) blue", "(A) red", False),
    ("(A.", "(A) red", True),  # '.' removed from the predicted option
    ("(C)red", "(C) red", True),  # gt option "(c)" is in "(c)red"
    ("(", "(B) two", True),  # release quirk: a bare "(" is contained in any option
    ("(D) x", "(A) x", False),
])
def test_check_answer(pred, gt, ok):
    assert P.check_answer(pred, gt) is ok


def test_check_answer_empty_gt():
    with pytest.raises(ValueError, match="ground truth answer is empty"):
        P.check_answer("(A)", "  ")


class _PieceTokenizer:
    """ids -> text pieces (a stand-in whose decode is plain concatenation)."""
    eos_token_id = 2

    def __init__(self, pieces: dict[int, str]):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.pieces[i] for i in ids)


@pytest.mark.parametrize("pieces,ids,stop,want", [
    ({10: "##", 11: "a"}, [10, 10], "###", ""),              # "##" + "##": the stop starts at 0, not 1
    ({10: "##", 11: "a"}, [11, 10, 10], "###", "a"),
    ({10: "x", 11: "B", 12: "pp"}, [10, 11, 12], "p", "xB"),  # the first "p" of the last token
    ({10: "a", 11: "b", 12: "c"}, [10, 11, 12, 11], "b", "abc"),  # an earlier one stood (min_new_tokens)
    ({10: "a", 11: "###"}, [10, 11], None, "a"),             # no stop string: the release's own cut
])
def test_release_answer_cuts_at_the_stop_that_ended_the_answer(pieces, ids, stop, want):
    """The answer text is cut where the engine's text is: at the occurrence the last token
    completed (text[:rfind] kept "#" of "####", and "xBp" of a "pp" token)."""
    assert P.release_answer(_PieceTokenizer(pieces), ids, stop) == want
