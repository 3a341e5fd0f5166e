from layoutc.tools.cli import main

raise SystemExit(main())
