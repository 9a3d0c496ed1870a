"""``geproxy explain``: the policy decided without serving.

- :mod:`.dryrun`: one request, every plugin's opinion printed (``geproxy explain METHOD
  TARGET``), and :class:`Decider`, the same decisions without printing;
- :mod:`.logs`: the requests of an access log, with the outcome each had;
- :mod:`.replay`: an access log decided again under another configuration
  (``--replay``), the changed verdicts printed;
- :mod:`.cases`: a file of requests with the verdict each must get (``--cases``).
"""

from .dryrun import Answer, Decider, Decision, explain

__all__ = ["explain", "Answer", "Decision", "Decider"]
