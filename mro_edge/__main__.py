from mro_edge.cli import main

raise SystemExit(main())
