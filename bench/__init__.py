"""fastrnn benchmark suite: ``python -m bench`` (see bench/README.md).

Public pieces for suite authors: :func:`bench.core.suite`, :class:`bench.core.Case`,
:class:`bench.core.Skip`, and :func:`bench.suites.rnn.register_provider`.
"""
