"""Every option set checks its fields' types first: a wrong type is one line naming the option, never a TypeError."""

from __future__ import annotations

import pytest

from lancet.correct import CorrectionArgs
from lancet.correct.select import SelectArgs
from lancet.influence import IndexArgs, InfluenceArgs
from lancet.options import OptionError


@pytest.mark.parametrize("make,message", [
    (lambda: InfluenceArgs(damping="0.1"), "invalid influence option damping='0.1': expected a number or null"),
    (lambda: InfluenceArgs(batch_size="8"), "invalid influence option batch_size='8': expected an integer"),
    (lambda: InfluenceArgs(bf16="no"), "invalid influence option bf16='no': expected true or false"),
    (lambda: InfluenceArgs(chunk_rows=None), "invalid influence option chunk_rows=None: expected an integer"),
    (lambda: InfluenceArgs(modules=3), "invalid influence option modules=3: expected a string or a list of strings"),
    (lambda: IndexArgs(rank="4"), "invalid index option rank='4': expected an integer"),
    (lambda: IndexArgs(bf16="no"), "invalid index option bf16='no': expected true or false"),
    (lambda: SelectArgs(prompts="p.jsonl", ordinary="o.jsonl", batch_size=True),
     "invalid select option batch_size=True: expected an integer"),
    (lambda: CorrectionArgs(beta="0.1"), "invalid correction option beta='0.1': expected a number"),
])
def test_a_wrong_type_is_one_line(make, message):
    with pytest.raises(OptionError) as err:
        make()
    assert str(err.value) == message


def test_right_types_pass_and_ints_are_numbers():
    assert InfluenceArgs(damping=1, modules=["q_proj"]).damping == 1
    assert CorrectionArgs(beta=1, top_k=3).beta == 1
