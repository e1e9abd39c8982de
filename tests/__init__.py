"""The test suite (run with ``scripts/test``)."""

import pytest

# The helpers' plain asserts get pytest's detailed messages too: registered before any is imported.
pytest.register_assert_rewrite("tests.helpers")
