"""What a person reads: ``pmk stats`` and ``pmk top``, and the table of stats keys they share."""
