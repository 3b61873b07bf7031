//! `mbank login` / `mbank logout`: tokens for a bank server, kept in the user's
//! credentials file (`~/.config/mbank/credentials.json`, readable only by its owner).

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};

#[derive(clap::Args)]
pub struct Args {
    /// The bank server, e.g. https://bank.lab:7070.
    pub url: String,
    /// Your user name on the bank.
    #[arg(long, short = 'u')]
    pub user: String,
    /// Read the password from the first line of standard input instead of asking on
    /// the terminal.
    #[arg(long)]
    pub password_stdin: bool,
    /// A CA certificate (PEM) to trust for this bank, when its certificate is not
    /// signed by a public authority, or the bank's own self-signed certificate (pinned:
    /// accepted as it is, e.g. one made by `openssl req -x509`). It is remembered with
    /// the token.
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// How long the token lives, e.g. 8h, 30d [default: 30d; at most 365d].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub ttl: Option<u64>,
}

/// `90`, `90s`, `15m`, `8h`, `30d` as seconds.
fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 90s, 15m, 8h or 30d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    n.checked_mul(mult)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("{s:?} is not a usable lifetime"))
}

pub fn login(args: Args, say: &dyn Fn(String)) -> Result<()> {
    let url = mbank_remote::normalize_url(&args.url);
    if !mbank_remote::is_url(&url) {
        bail!("{url:?} is not a bank URL: expected https://HOST:PORT (or http://)");
    }
    let ca = match &args.ca_cert {
        Some(p) => Some(
            std::fs::canonicalize(p)
                .with_context(|| format!("cannot find the CA certificate {}", p.display()))?,
        ),
        None => None,
    };
    let password = if args.password_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("read the password from standard input")?;
        line.trim_end_matches(['\n', '\r']).to_string()
    } else {
        crate::admin::ask_hidden(&format!("password for {} at {url}: ", args.user))?
    };
    let r = mbank_remote::login(&url, &args.user, &password, args.ttl, ca.as_deref())?;
    mbank_remote::credentials::save(
        &url,
        mbank_remote::Credential {
            token: r.token,
            user: args.user.clone(),
            expires_ms: r.expires_ms,
            ca,
        },
    )?;
    say(format!(
        "logged in to {url} as {} until {} UTC; use it with --bank {url}",
        args.user,
        mbank_core::utc_datetime(r.expires_ms)
    ));
    Ok(())
}

/// Revokes the token for `url` on the server and forgets it here.
pub fn logout(url: &str, say: &dyn Fn(String)) -> Result<()> {
    let url = mbank_remote::normalize_url(url);
    let client = mbank_remote::connect(&url, None)?;
    let revoked = client.logout();
    let had = mbank_remote::credentials::remove(&url)?.is_some();
    match revoked {
        Ok(()) => say(format!("logged out of {url}: the token is revoked")),
        Err(e) if had => say(format!(
            "forgot the token for {url}, but the server did not revoke it ({e}); it expires on its own"
        )),
        Err(e) => return Err(e.into()),
    }
    Ok(())
}
