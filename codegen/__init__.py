"""TVM code generation and tuning for compact models (installed as ``graphprune.codegen``)."""
