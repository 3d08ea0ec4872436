from pmk.cli import main

raise SystemExit(main())
