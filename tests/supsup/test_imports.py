import sys

import supsup


def test_x() -> None:
    print(supsup.__file__, sys.path[:4])
    assert supsup.__doc__
