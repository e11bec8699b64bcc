//! Challenges that gate a protected sale's order token: an ALTCHA-compatible proof of work, or a
//! question a human answers.
//!
//! Both are stateless until solved: what the server must remember travels in the `salt`, which is
//! `<mac>?r=<random>&s=<sale>&i=<item>&u=<user>&expires=<unix s>[&t=<served ms>]&`: the parameters
//! (ALTCHA's `?expires=` convention) bind the challenge to one buyer and a time, and `<mac>`, an
//! HMAC of them, makes the salt itself unforgeable, so checking one costs no database work. The
//! trailing `&` ends the salt unambiguously: no digit of the number (or the answer) can be moved
//! into it to stretch `expires` or `t`. A question's salt carries the time it was served, so an
//! answer that comes back sooner than a human could read it is refused; the reading time
//! (`min_answer_ms`) counts from the later of serving and the sale's start, so a question
//! fetched during the lead window cannot be answered at T+0.
//!
//! - **pow** (ALTCHA v1): `challenge = hex(SHA-256(salt ‖ number))` for a secret random `number` in
//!   `0..=maxnumber`; `signature = hex(HMAC-SHA256(challenge key, challenge))`. The client tries
//!   numbers until the hash matches: `maxnumber / 2` hashes on average.
//! - **question**: a small sum; `signature = hex(HMAC-SHA256(challenge key, "question" ‖ salt ‖
//!   answer))`, so the answer is not in the challenge and only the server can check it.
//!
//! A solution is used once: [`Verified::replay_key`] is recorded (on the user's group) when it is
//! exchanged for an order token, and a second exchange is refused. A question is used up by its
//! first answer, right or wrong (its answers are few: guessing must cost a new question each time);
//! a proof of work only by a right one (checking it is cheap and needs no record).

use super::keys::Keys;
use crate::domain::{ItemId, SaleId, UserId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Who and what a challenge is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    pub sale: SaleId,
    pub item: ItemId,
    pub user: UserId,
}

/// A challenge as served (`GET .../challenge`). The proof-of-work fields are ALTCHA v1's.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Challenge {
    /// Find `number` in `0..=maxnumber` with `hex(SHA-256(salt + number)) == challenge`.
    Pow {
        #[schema(example = "SHA-256")]
        algorithm: String,
        challenge: String,
        maxnumber: u64,
        salt: String,
        signature: String,
        /// Unix seconds after which a solution is refused (also in the salt).
        expires: i64,
    },
    /// Answer `question` (digits).
    Question {
        question: String,
        salt: String,
        signature: String,
        expires: i64,
    },
}

/// A buyer's solution (`{"solution": ...}` of the order-token request). ALTCHA's payload
/// (`algorithm`, `challenge`, `number`, `salt`, `signature`, `took`) is accepted as it is.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Solution {
    /// Proof of work: the number found.
    #[serde(default)]
    pub number: Option<u64>,
    /// Question: the answer.
    #[serde(default)]
    #[schema(max_length = 64)]
    pub answer: Option<String>,
    #[schema(max_length = 256)]
    pub salt: String,
    /// Proof of work: the challenge as served (optional; checked when given).
    #[serde(default)]
    pub challenge: Option<String>,
    pub signature: String,
    /// ALTCHA's; `SHA-256` when given.
    #[serde(default)]
    pub algorithm: Option<String>,
    /// ALTCHA's solving time in ms: accepted from its widgets, and ignored.
    #[serde(default)]
    #[allow(dead_code)]
    pub(crate) took: Option<f64>,
}

/// Why a solution was refused (403 `challenge_failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("challenge failed: {0}")]
pub struct Failed(pub &'static str);

/// A solution to record as used: one that checks out, or a question's wrong answer (which uses
/// the question up, then fails).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verified {
    /// SHA-256 of the salt: the record that makes the solution single-use.
    pub(crate) replay_key: [u8; 32],
    /// Unix seconds after which the record is useless (the challenge has expired).
    pub expires: i64,
    /// Record, then refuse with this.
    pub(crate) then_fail: Option<Failed>,
}

fn random_u64() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}

fn salt(keys: &Keys, b: &Binding, expires: i64, issued_ms: Option<i64>) -> String {
    let random = hex::encode(&uuid::Uuid::new_v4().into_bytes()[..8]);
    let mut query = format!(
        "r={random}&s={}&i={}&u={}&expires={expires}&",
        b.sale, b.item, b.user
    );
    if let Some(t) = issued_ms {
        query.push_str(&format!("t={t}&"));
    }
    let mac = keys.sign_challenge(&[b"salt\n", query.as_bytes()]);
    format!("{}?{query}", &mac[..24])
}

fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    hex::encode(h.finalize())
}

pub(crate) fn pow(keys: &Keys, b: &Binding, max_number: u32, expires: i64) -> Challenge {
    let salt = salt(keys, b, expires, None);
    let number = random_u64() % (u64::from(max_number) + 1);
    let challenge = sha256_hex(&[salt.as_bytes(), number.to_string().as_bytes()]);
    Challenge::Pow {
        algorithm: "SHA-256".into(),
        signature: keys.sign_challenge(&[challenge.as_bytes()]),
        challenge,
        maxnumber: max_number.into(),
        salt,
        expires,
    }
}

pub(crate) fn question(keys: &Keys, b: &Binding, issued_ms: i64, expires: i64) -> Challenge {
    let salt = salt(keys, b, expires, Some(issued_ms));
    let (x, y) = (2 + random_u64() % 18, 2 + random_u64() % 18);
    let answer = (x + y).to_string();
    Challenge::Question {
        question: format!("How much is {x} plus {y}? (Answer in digits.)"),
        signature: keys.sign_challenge(&question_parts(&salt, &answer)),
        salt,
        expires,
    }
}

/// What a question's signature covers: the salt (which ends with `&`) and the answer, apart.
fn question_parts<'a>(salt: &'a str, answer: &'a str) -> [&'a [u8]; 4] {
    [b"question\n", salt.as_bytes(), b"\n", answer.as_bytes()]
}

/// The parameters a salt carries.
struct Salted {
    binding: (u64, u64, u64),
    expires: i64,
    issued_ms: Option<i64>,
}

/// The parameters of one of our salts, or None when it is not one (its MAC does not verify, it
/// does not end with `&`, a parameter is unknown, repeated or missing).
fn parse_salt(keys: &Keys, salt: &str) -> Option<Salted> {
    let (mac, query) = salt.split_once('?')?;
    let pairs = query.strip_suffix('&')?;
    if mac.len() != 24 || !keys.verify_challenge_prefix(&[b"salt\n", query.as_bytes()], mac) {
        return None;
    }
    let (mut r, mut s, mut i, mut u, mut e, mut t) = (None, None, None, None, None, None);
    for pair in pairs.split('&') {
        let (k, v) = pair.split_once('=')?;
        let slot = match k {
            "r" => {
                r = Some(());
                continue;
            }
            "s" => &mut s,
            "i" => &mut i,
            "u" => &mut u,
            "expires" => &mut e,
            "t" => &mut t,
            _ => return None,
        };
        if slot.is_some() {
            return None;
        }
        *slot = Some(v.parse::<i64>().ok()?);
    }
    r?;
    let key = |v: Option<i64>| v.and_then(|n| u64::try_from(n).ok());
    Some(Salted {
        binding: (key(s)?, key(i)?, key(u)?),
        expires: e?,
        issued_ms: t,
    })
}

/// Check `solution` for a challenge of `p.challenge` issued to `b`, at `now_ms`, for a sale
/// that starts at `starts_ms`.
// Long on purpose: the checks a solution must pass, cheapest first, each with its own answer.
pub(crate) fn verify(
    keys: &Keys,
    p: &crate::domain::Protection,
    b: &Binding,
    solution: &Solution,
    now_ms: i64,
    starts_ms: i64,
) -> Result<Verified, Failed> {
    use crate::domain::ChallengeKind;
    if solution.salt.len() > 256 || solution.signature.len() > 128 {
        return Err(Failed("the solution's salt or signature is too long"));
    }
    let salted = parse_salt(keys, &solution.salt).ok_or(Failed("the salt is not one of ours"))?;
    if salted.binding != (b.sale.key(), b.item.key(), b.user.key()) {
        return Err(Failed("it was issued for another user, item or sale"));
    }
    let expires_ms = salted.expires.saturating_mul(1000);
    if now_ms >= expires_ms {
        return Err(Failed("it has expired: get a new challenge"));
    }
    // A salt is never issued further ahead than the lead window plus a token's life (with a
    // minute's slack for a clock step); one that says otherwise was not made for this sale.
    let horizon = i64::from(p.challenge_lead_secs + p.token_ttl_secs + 60) * 1000;
    if expires_ms > now_ms.saturating_add(horizon) {
        return Err(Failed("the salt is not one of ours"));
    }
    let verified = Verified {
        replay_key: Sha256::digest(solution.salt.as_bytes()).into(),
        expires: salted.expires,
        then_fail: None,
    };
    match p.challenge {
        ChallengeKind::Pow => {
            if solution
                .algorithm
                .as_deref()
                .is_some_and(|a| a != "SHA-256")
            {
                return Err(Failed("the algorithm must be SHA-256"));
            }
            let number = solution
                .number
                .ok_or(Failed("a proof of work needs `number`"))?;
            let challenge = sha256_hex(&[solution.salt.as_bytes(), number.to_string().as_bytes()]);
            if solution.challenge.as_ref().is_some_and(|c| *c != challenge) {
                return Err(Failed("the number does not solve the challenge"));
            }
            if !keys.verify_challenge(&[challenge.as_bytes()], &solution.signature) {
                return Err(Failed(
                    "the number does not solve the challenge, or the signature is not ours",
                ));
            }
            Ok(verified)
        }
        ChallengeKind::Question => {
            let issued = salted
                .issued_ms
                .ok_or(Failed("the salt is not a question's"))?;
            // The reading time counts from the start, not from serving: a question fetched
            // during the lead window and answered by a script at T+0 is still too fast.
            if now_ms < issued.max(starts_ms).saturating_add(p.min_answer_ms.into()) {
                return Err(Failed("answered too fast"));
            }
            let answer = solution
                .answer
                .as_deref()
                .ok_or(Failed("a question needs `answer`"))?
                .trim();
            let right = answer.len() <= 64
                && keys
                    .verify_challenge(&question_parts(&solution.salt, answer), &solution.signature);
            Ok(Verified {
                then_fail: (!right).then_some(Failed(
                    "wrong answer, or the signature is not ours: get a new question",
                )),
                ..verified
            })
        }
        ChallengeKind::None => Err(Failed("this sale has no challenge")),
    }
}

/// Find the number of a proof-of-work challenge, as a client does (tests and the bench).
pub fn solve_pow(challenge: &str, salt: &str, max_number: u64) -> Option<u64> {
    (0..=max_number).find(|n| sha256_hex(&[salt.as_bytes(), n.to_string().as_bytes()]) == challenge)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use crate::domain::{ChallengeKind, Protection};

    fn keys() -> Keys {
        Keys::new(&[Secret::new("a-challenge-key-a-challenge-key-01")])
    }

    fn binding(user: u64) -> Binding {
        Binding {
            sale: SaleId::parse(5).unwrap(),
            item: ItemId::parse(6).unwrap(),
            user: UserId::parse(user.into()).unwrap(),
        }
    }

    fn protection(challenge: ChallengeKind, min_answer_ms: u32) -> Protection {
        Protection {
            challenge,
            min_answer_ms,
            ..Protection::default()
        }
    }

    fn pow_solution(c: &Challenge) -> Solution {
        let Challenge::Pow {
            challenge,
            salt,
            signature,
            maxnumber,
            ..
        } = c
        else {
            panic!("not a pow challenge")
        };
        Solution {
            number: solve_pow(challenge, salt, *maxnumber),
            answer: None,
            salt: salt.clone(),
            challenge: Some(challenge.clone()),
            signature: signature.clone(),
            algorithm: Some("SHA-256".into()),
            took: Some(12.0),
        }
    }

    #[test]
    fn a_solved_pow_verifies_for_its_user_until_it_expires() {
        let (k, p) = (keys(), protection(ChallengeKind::Pow, 0));
        let c = pow(&k, &binding(42), 2_000, 100);
        let s = pow_solution(&c);
        let ok = verify(&k, &p, &binding(42), &s, 99_999, 0).unwrap();
        assert_eq!((ok.expires, ok.then_fail), (100, None));
        assert_eq!(
            verify(&k, &p, &binding(43), &s, 0, 0),
            Err(Failed("it was issued for another user, item or sale"))
        );
        assert!(verify(&k, &p, &binding(42), &s, 100_000, 0).is_err());
        let mut wrong = s.clone();
        wrong.number = wrong.number.map(|n| n + 1);
        assert!(verify(&k, &p, &binding(42), &wrong, 0, 0).is_err());
        wrong.challenge = None;
        assert!(verify(&k, &p, &binding(42), &wrong, 0, 0).is_err());
        let mut forged = s.clone();
        forged.signature = "00".repeat(32);
        assert!(verify(&k, &p, &binding(42), &forged, 0, 0).is_err());
        // A salt rewritten for another user no longer carries our MAC.
        let mut moved = s.clone();
        moved.salt = s.salt.replace("&u=42&", "&u=43&");
        assert_eq!(
            verify(&k, &p, &binding(43), &moved, 0, 0),
            Err(Failed("the salt is not one of ours"))
        );
    }

    /// Moving the number's leading digits into the salt (or the salt's last digits into an answer)
    /// keeps `salt + number` the same; it must not stretch `expires` or `t`.
    #[test]
    fn digits_cannot_move_between_the_salt_and_the_solution() {
        let (k, p) = (keys(), protection(ChallengeKind::Pow, 0));
        for _ in 0..20 {
            let c = pow(&k, &binding(42), 100_000, 100);
            let s = pow_solution(&c);
            let n = s.number.unwrap().to_string();
            if n.len() < 2 {
                continue;
            }
            let mut stretched = s.clone();
            stretched.salt = format!("{}{}", s.salt, &n[..1]);
            stretched.number = n[1..].parse().ok();
            assert_eq!(
                verify(&k, &p, &binding(42), &stretched, 0, 0),
                Err(Failed("the salt is not one of ours"))
            );
        }
        // A salt that says it expires far beyond what we ever issue is not ours either.
        let far = pow(&k, &binding(42), 1_000, 10_000_000);
        assert!(verify(&k, &p, &binding(42), &pow_solution(&far), 0, 0).is_err());
    }

    #[test]
    fn a_question_needs_the_right_answer_and_a_human_pace() {
        let (k, p) = (keys(), protection(ChallengeKind::Question, 1_000));
        let c = question(&k, &binding(42), 1_000, 100);
        let Challenge::Question {
            question,
            salt,
            signature,
            ..
        } = &c
        else {
            panic!()
        };
        let words: Vec<u64> = question
            .split(|ch: char| !ch.is_ascii_digit())
            .filter_map(|w| w.parse().ok())
            .collect();
        let answer = (words[0] + words[1]).to_string();
        let s = |answer: &str| Solution {
            number: None,
            answer: Some(answer.into()),
            salt: salt.clone(),
            challenge: None,
            signature: signature.clone(),
            algorithm: None,
            took: None,
        };
        let b = binding(42);
        assert_eq!(
            verify(&k, &p, &b, &s(&answer), 2_000, 0).unwrap().then_fail,
            None
        );
        assert_eq!(
            verify(&k, &p, &b, &s(&format!(" {answer} ")), 2_000, 0)
                .unwrap()
                .then_fail,
            None
        );
        assert_eq!(
            verify(&k, &p, &b, &s(&answer), 1_999, 0),
            Err(Failed("answered too fast"))
        );
        // A wrong answer is recorded (the question is used up), then refused.
        assert!(verify(&k, &p, &b, &s("1000"), 2_000, 0)
            .unwrap()
            .then_fail
            .is_some());
        // The served time's last digit moved into the answer: no longer our salt.
        let mut moved = s(&format!("0{answer}"));
        moved.salt = salt.replacen("&t=1000&", "&t=100&", 1);
        assert!(verify(&k, &p, &b, &moved, 2_000, 0).is_err());
        // A pow solution is not a question's, and the other way round.
        let pow_p = protection(ChallengeKind::Pow, 0);
        assert!(verify(&k, &pow_p, &b, &s(&answer), 2_000, 0).is_err());
        // Fetched during the lead window (served at 1000) for a sale starting at 60_000: the
        // reading time counts from the start, so a script's answer at T+0.15 s is too fast.
        assert_eq!(
            verify(&k, &p, &b, &s(&answer), 60_150, 60_000),
            Err(Failed("answered too fast"))
        );
        assert!(verify(&k, &p, &b, &s(&answer), 61_000, 60_000).is_ok());
    }

    #[test]
    fn the_replay_key_is_the_salts() {
        let (k, p) = (keys(), protection(ChallengeKind::Pow, 0));
        let (a, b) = (
            pow(&k, &binding(1), 1_000, 50),
            pow(&k, &binding(1), 1_000, 50),
        );
        let (sa, sb) = (pow_solution(&a), pow_solution(&b));
        let va = verify(&k, &p, &binding(1), &sa, 0, 0).unwrap();
        let vb = verify(&k, &p, &binding(1), &sb, 0, 0).unwrap();
        assert_ne!(va.replay_key, vb.replay_key, "each challenge is its own");
        assert_eq!(va, verify(&k, &p, &binding(1), &sa, 0, 0).unwrap());
    }

    #[test]
    fn salts_parse_strictly() {
        let k = keys();
        let good = super::salt(&k, &binding(7), 99, Some(5));
        assert!(parse_salt(&k, &good).is_some());
        for bad in [
            good.trim_end_matches('&').to_string(),
            good.replace("&s=5&", "&s=5&s=5&"),
            good.replace("?r=", "?x=1&r="),
            format!("{good}x"),
            good.replacen(&good[..3], "000", 1),
        ] {
            assert!(parse_salt(&k, &bad).is_none(), "{bad}");
        }
    }
}
