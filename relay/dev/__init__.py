"""Development only: a local chain with the test USDC (`chain`) and the whole stack on one
machine for `relay dev` (`stack`). Production code never imports this package."""
