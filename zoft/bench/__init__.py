"""`zoft bench`: the timing harness (harness) and the MeZO reference step it measures against (reference),
apart from the library core: no training code imports them."""
