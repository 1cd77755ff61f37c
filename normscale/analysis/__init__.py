"""Analysis: the normative model of strategy selection (SPEC D) and the standard figures."""
