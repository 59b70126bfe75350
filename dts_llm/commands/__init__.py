"""The `dts-llm` commands, one module each, on top of the library: ``train`` (sft, distill), ``sweep``,
``quickstart``, ``demo``, ``teacher_report`` and ``evaluate`` (the eval package's command). The library never
imports them; ``dts_llm.cli`` dispatches to them."""
