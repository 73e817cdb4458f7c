"""Checks on an untrusted model archive, made before torch reads a byte of it.

torch turns a ``torch.export`` archive back into a module by generating Python
source and executing it: parameter and module names are pasted into that source
(``getattr(self, "<name>")``), shape expressions go through ``sympy.sympify``
(an ``eval``), the program's ``guards_code`` is ``exec``'d, operator names are
resolved with ``getattr`` chains from ``torch``, and some payloads are unpickled
or loaded as shared libraries (AOTInductor). So a crafted name runs code. This
module reads the zip and its JSON with the standard library only and refuses,
naming the offending value, anything outside what ``torch.export.save`` writes
for a plain model:

* members: one root folder, no duplicates, only the files a plain program has
  (no AOTInductor libraries, no pickled weights, custom or opaque objects);
* names (graph nodes, inputs, outputs, keyword arguments, forward arguments):
  Python identifiers; parameter, buffer and module paths: dotted
  ``[A-Za-z0-9_]`` atoms;
* operators: ``torch.ops.<namespace>.<op>.<overload>`` in known namespaces, and
  the few Python operators torch itself records (``_operator.getitem``, ...);
* shape expressions and guards: parsed with :mod:`ast` and allowed only when every
  node is arithmetic, a comparison, a number, a shape symbol or an allow-listed
  function; nothing is evaluated here;
* tensor payloads: raw bytes whose declared sizes, strides and offsets fit.

:func:`write_canonical_pt2` then writes the accepted parts into a new archive
(node metadata such as stack traces dropped: bitplan does not use it), and only
that archive is given to torch. TorchScript archives get the same treatment in
:func:`check_torchscript` (their code is parsed, never run, and their pickles are
scanned opcode by opcode).

Torch-free: standard library only. ``zips`` (sizes, members, pickles), ``names`` (names, operators,
expressions), ``program`` (the program JSON), ``pt2`` and ``torchscript`` (the two archive kinds).
"""

from bitplan.archives.names import SYMPY_FUNCTIONS, check_guard, check_operator, check_sym_expr
from bitplan.archives.pt2 import CheckedPt2, check_pt2, write_canonical_pt2
from bitplan.archives.torchscript import check_torchscript
from bitplan.archives.zips import Refused, check_unpacked_size, max_unpacked_bytes, members, shown

__all__ = ["SYMPY_FUNCTIONS", "CheckedPt2", "Refused", "check_guard", "check_operator", "check_pt2", "check_sym_expr",
           "check_torchscript", "check_unpacked_size", "max_unpacked_bytes", "members", "shown", "write_canonical_pt2"]
