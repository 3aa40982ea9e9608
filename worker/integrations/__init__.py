"""Integrations with the tools users train with: a PyTorch Lightning callback (``worker.integrations.lightning``,
extra ``lightning``) and cleanlab's label-issue finders on the LOO's class probabilities
(``worker.integrations.label_issues``, extra ``cleanlab``). Each imports its package only when used."""
