import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tsds_interp.task import (
    ACCEPT,
    DECISION,
    END,
    EOS,
    PAD,
    PADDING,
    PROMPT,
    REJECT,
    SAMPLE,
    VOCAB,
    States,
    TaskConfig,
    answer_tokens,
    build_trajectories,
    check,
    decode,
    encode,
    num_digits,
    parse_candidate,
    prompt_tokens,
    sample_questions,
    state_tokens,
    token_roles,
)

TASK = TaskConfig(width=2, budget=2, train_cells=((1, 1), (1, 2), (2, 2)), ood_cells=((2, 1),))


@given(st.lists(st.sampled_from(VOCAB), max_size=40))
def test_encode_decode_round_trip(items):
    text = " ".join(items)
    assert decode(encode(text)) == text
    assert encode(decode(encode(text))) == encode(text)


def test_unknown_token_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown token 'x'"):
        encode("1 x 2")


@given(st.integers(0, 99), st.integers(0, 99), st.sampled_from(["reversed", "forward"]))
def test_answer_parse_round_trip_and_checker(a, b, order):
    task = TaskConfig(width=2, answer_order=order, train_cells=((1, 1),), ood_cells=())
    at, bt = torch.tensor([a]), torch.tensor([b])
    cand = answer_tokens(at * bt, task)
    assert parse_candidate(cand, task).item() == a * b
    assert check(at, bt, cand, task).item()
    wrong = answer_tokens(at * bt + 1, task)
    assert not check(at, bt, wrong, task).item()


def test_reversed_answer_layout():
    assert decode(answer_tokens(torch.tensor([56]), TASK)[0]) == "6 5 0 0"
    fwd = TaskConfig(width=2, answer_order="forward", train_cells=((1, 1),), ood_cells=())
    assert decode(answer_tokens(torch.tensor([56]), fwd)[0]) == "0 0 5 6"


def test_non_digit_candidate_is_invalid():
    cand = torch.tensor([encode("6 <accept> 0 0")])
    assert parse_candidate(cand, TASK).item() == -1
    assert not check(torch.tensor([7]), torch.tensor([8]), cand, TASK).item()


def test_roles_on_hand_written_trajectories():
    # 7 * 8 = 56: wrong candidate 55 rejected, right one accepted.
    text = "<bos> 0 7 * 0 8 = 5 5 0 0 <reject> 6 5 0 0 <accept> <eos>"
    roles = token_roles(torch.tensor([encode(text)]), TASK)[0].tolist()
    P, S, D, E = PROMPT, SAMPLE, DECISION, END
    assert roles == [P] * 7 + [S] * 4 + [D] + [S] * 4 + [D] + [E]
    # accepted at once, then EOS and padding
    text = "<bos> 0 7 * 0 8 = 6 5 0 0 <accept> <eos> <pad> <pad> <pad> <pad> <pad>"
    roles = token_roles(torch.tensor([encode(text)]), TASK)[0].tolist()
    assert roles == [P] * 7 + [S] * 4 + [D] + [E] + [PADDING] * 5
    # malformed: the episode ended inside a candidate
    text = "<bos> 0 7 * 0 8 = 6 * <eos> <pad>"
    roles = token_roles(torch.tensor([encode(text)]), TASK)[0].tolist()
    assert roles == [P] * 7 + [S, S, E, PADDING]


def test_build_trajectories_matches_the_format():
    a, b = torch.tensor([7, 7]), torch.tensor([8, 8])
    tr = build_trajectories(a, b, [torch.tensor([55, 56]), torch.tensor([56, 0])],
                            [torch.tensor([REJECT, ACCEPT]), torch.tensor([ACCEPT, ACCEPT])], TASK)
    assert decode(tr[0]) == "<bos> 0 7 * 0 8 = 5 5 0 0 <reject> 6 5 0 0 <accept> <eos>"
    assert decode(tr[1]).startswith("<bos> 0 7 * 0 8 = 6 5 0 0 <accept> <eos> <pad>")
    assert tr.shape[1] == TASK.max_len


def test_prompt_is_fixed_width():
    p = prompt_tokens(torch.tensor([3, 45]), torch.tensor([12, 6]), TASK)
    assert decode(p[0]) == "<bos> 0 3 * 1 2 ="
    assert p.shape == (2, TASK.prompt_len)


def test_splits_are_disjoint_reproducible_and_in_their_cells():
    task = TaskConfig(width=2, train_cells=((2, 2),), ood_cells=((1, 2),), test_fraction=0.2)
    tr = sample_questions(task, "train", 3000, seed=0)
    te = sample_questions(task, "test", 500, seed=1)
    assert not ({(int(x), int(y)) for x, y in zip(tr.a, tr.b)} & {(int(x), int(y)) for x, y in zip(te.a, te.b)})
    again = sample_questions(task, "train", 3000, seed=0)
    assert torch.equal(tr.a, again.a) and torch.equal(tr.b, again.b)
    assert set(tr.cells) == {(2, 2)}
    assert set(sample_questions(task, "ood", 50, seed=0).cells) == {(1, 2)}


def test_cells_spread_evenly():
    q = sample_questions(TASK, "train", 300, seed=0)
    cells = q.cells
    assert {c: cells.count(c) for c in set(cells)} == {(1, 1): 100, (1, 2): 100, (2, 2): 100}
    assert num_digits(torch.tensor([0, 9, 10, 99, 100])).tolist() == [1, 1, 2, 2, 3]


@pytest.mark.parametrize("kwargs,msg", [
    (dict(width=0), "width"), (dict(budget=0), "budget"), (dict(answer_order="up"), "answer_order"),
    (dict(width=2, train_cells=((3, 1),)), "width=2"), (dict(test_fraction=1.5), "test_fraction"),
])
def test_bad_task_config(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        TaskConfig(**kwargs)


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        sample_questions(TASK, "valid", 3, 0)


def test_pad_and_eos_ids_distinct():
    assert len({EOS, PAD, ACCEPT, REJECT}) == 4


@pytest.mark.parametrize("kwargs,message", [
    (dict(width=10), "width must be an integer in [1, 9], got 10"),
    (dict(width=2.5), "width must be an integer in [1, 9], got 2.5"),
    (dict(budget=65), "budget must be an integer in [1, 64], got 65"),
    (dict(test_fraction=0), "test_fraction must be a finite number in (0, 0.99], got 0"),
    (dict(test_fraction=0.995), "test_fraction must be a finite number in (0, 0.99], got 0.995"),
    (dict(task_format="x"), "task_format must be 'oneshot' or 'steps', got 'x'"),
    (dict(answer_order="up"), "answer_order must be 'reversed' or 'forward', got 'up'"),
    (dict(width=2, train_cells=((1, 3),)), "cell (1, 3): each operand has 1 to width=2 digits"),
    (dict(width=2, train_cells=((0, 1),)), "cell (0, 1): each operand has 1 to width=2 digits"),
    (dict(width=2, train_cells=((1, 1),), ood_cells=((3, 1),)), "cell (3, 1): each operand has 1 to width=2 digits"),
    (dict(train_cells=()), "train_cells is empty: give at least one (digits_a, digits_b) cell"),
])
def test_task_config_bounds_and_their_messages(kwargs, message):
    with pytest.raises(ValueError) as e:
        TaskConfig(**kwargs)
    assert str(e.value) == message


def test_task_config_accepts_its_bounds():
    for ok in (dict(width=9), dict(width=1, train_cells=((1, 1),), ood_cells=()), dict(budget=64), dict(budget=1),
               dict(test_fraction=0.99), dict(width=2, train_cells=((2, 2),), ood_cells=((1, 2),))):
        task = TaskConfig(**ok)
        assert all(getattr(task, k) == (tuple(v) if isinstance(v, tuple) else v) for k, v in ok.items())


def test_the_held_out_split_is_a_fixed_hash_of_the_question_and_operands_have_their_cells_digits():
    """A question is held out when blake2b("a*b") (4 bytes, little-endian, over 2**32) lies below
    test_fraction: the same questions in every version and on every machine. Operands of a d-digit
    side lie in [10**(d-1), 10**d), 1-digit ones in [1, 9]."""
    import hashlib

    task = TaskConfig(width=3, train_cells=((1, 3), (3, 2)), ood_cells=(), test_fraction=0.2)

    def held_out(a, b):
        key = hashlib.blake2b(f"{int(a)}*{int(b)}".encode(), digest_size=4).digest()
        return int.from_bytes(key, "little") / 2**32 < 0.2
    for split, seed in (("train", 0), ("test", 1)):
        q = sample_questions(task, split, 400, seed=seed)
        assert all(held_out(a, b) == (split == "test") for a, b in zip(q.a, q.b)), split
        for (da, db), a, b in zip(q.cells, q.a.tolist(), q.b.tolist()):
            assert (1 if da == 1 else 10 ** (da - 1)) <= a < 10**da and (1 if db == 1 else 10 ** (db - 1)) <= b < 10**db
        assert {c for c in q.cells} == {(1, 3), (3, 2)}
    with pytest.raises(ValueError, match="asked for 0 questions; ask for at least 1"):
        sample_questions(task, "train", 0, seed=0)
    assert len(sample_questions(task, "train", 1, seed=0)) == 1


def test_the_default_cells_are_the_documented_ones():
    """README: in distribution 1x1, 1x2, 2x1, 2x2, 1x3, 3x1, 2x3, 3x2; out of distribution 3x3; 10% held out."""
    task = TaskConfig()
    assert task.train_cells == ((1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1), (2, 3), (3, 2))
    assert task.ood_cells == ((3, 3),) and task.test_fraction == 0.1 and task.width == 3 and task.budget == 3


def test_operands_are_checked_at_their_exact_bounds_with_messages_naming_the_fix():
    top = torch.tensor([0, 99])
    prompt_tokens(top, top.flip(0), TASK)  # 0 and 10**width - 1 both fit
    prompt_tokens(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), TASK)
    cases = [
        ((torch.tensor([100]), torch.tensor([1])),
         "operands a must be in [0, 99] (width 2 digits), got values in [100, 100]"),
        ((torch.tensor([1]), torch.tensor([-1, 5])),
         "operands b must be in [0, 99] (width 2 digits), got values in [-1, 5]"),
        ((torch.tensor([1.0]), torch.tensor([1])), "operands a must be an integer tensor, got torch.float32"),
        ((torch.tensor([1]), torch.tensor([True])), "operands b must be an integer tensor, got torch.bool"),
        ((torch.tensor([1j]), torch.tensor([1])), "operands a must be an integer tensor, got torch.complex64"),
        (([1], torch.tensor([1])), "operands a must be an integer tensor, got list"),
        ((torch.tensor([[1]]), torch.tensor([1])), "operands a must be one-dimensional, got shape (1, 1)"),
        ((torch.tensor([1, 2]), torch.tensor([1])), "operands a and b differ in length: 2 and 1"),
    ]
    for (a, b), message in cases:
        with pytest.raises(ValueError) as err:
            prompt_tokens(a, b, TASK)
        assert str(err.value) == message


def test_states_are_checked_at_their_exact_bounds():
    steps = TaskConfig(**{**TASK.to_dict(), "task_format": "steps"})
    fits = States(torch.tensor([99, 0]), torch.tensor([99, 1]), torch.tensor([9999, 0]))
    assert state_tokens(fits, steps).shape == (2, 1 + 2 + 1 + 2 + 1 + 4)
    message = "a state does not fit width 2: x, y need at most 2 digits, r 4"
    for x, y, r in ((100, 1, 0), (1, 100, 0), (1, 1, 10000)):
        with pytest.raises(ValueError) as err:
            state_tokens(States(torch.tensor([x]), torch.tensor([y]), torch.tensor([r])), steps)
        assert str(err.value) == message
    assert state_tokens(States(*(torch.tensor([], dtype=torch.long),) * 3), steps).shape == (0, 11)
