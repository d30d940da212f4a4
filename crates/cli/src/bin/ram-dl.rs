//! `ram-dl`: "download RAM". Memory served by a `ram-ul` becomes swap space on this host; see
//! [`r3map_cli::ram_dl`].

fn main() -> anyhow::Result<()> {
    r3map_cli::ram_dl::main()
}
