//! Two statistical checks of a draw's fairness, for the bench and the tests: that winning does not
//! depend on when an entrant arrived (Pearson's chi-square test of independence), and that a group
//! of entrants (bots at the first millisecond) won no more than chance gives (the hypergeometric
//! upper tail). Plain numerics (a Lanczos log-gamma and the regularized incomplete gamma function,
//! as in Numerical Recipes), no dependency.

/// ln Γ(x) for x > 0 (Lanczos, g = 7, n = 9: about 15 significant digits).
pub(crate) fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection.
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + 7.5;
    let sum = G[1..]
        .iter()
        .enumerate()
        .fold(G[0], |acc, (i, g)| acc + g / (x + i as f64 + 1.0));
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// The upper regularized incomplete gamma function Q(a, x).
pub(crate) fn gamma_q(a: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    let lead = -x + a * x.ln() - ln_gamma(a);
    if x < a + 1.0 {
        // Series for P, then Q = 1 - P.
        let (mut sum, mut term, mut n) = (1.0 / a, 1.0 / a, a);
        for _ in 0..1000 {
            n += 1.0;
            term *= x / n;
            sum += term;
            if term.abs() < sum.abs() * 1e-15 {
                break;
            }
        }
        (1.0 - sum * lead.exp()).clamp(0.0, 1.0)
    } else {
        // Continued fraction (modified Lentz).
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..1000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let delta = d * c;
            h *= delta;
            if (delta - 1.0).abs() < 1e-15 {
                break;
            }
        }
        (lead.exp() * h).clamp(0.0, 1.0)
    }
}

/// Pearson's chi-square test that winning is independent of the group (arrival wave): `groups` are
/// (entrants, winners). The statistic and its p-value (degrees of freedom: groups - 1).
pub fn independence(groups: &[(u64, u64)]) -> (f64, f64) {
    let groups: Vec<(f64, f64)> = groups
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|&(n, k)| (n as f64, k as f64))
        .collect();
    let n: f64 = groups.iter().map(|g| g.0).sum();
    let k: f64 = groups.iter().map(|g| g.1).sum();
    if groups.len() < 2 || k == 0.0 || k == n {
        return (0.0, 1.0);
    }
    let x2: f64 = groups
        .iter()
        .map(|&(entrants, winners)| {
            let win = entrants * k / n;
            let lose = entrants - win;
            (winners - win).powi(2) / win + ((entrants - winners) - lose).powi(2) / lose
        })
        .sum();
    let df = (groups.len() - 1) as f64;
    (x2, gamma_q(df / 2.0, x2 / 2.0))
}

fn ln_choose(n: u64, k: u64) -> f64 {
    ln_gamma(n as f64 + 1.0) - ln_gamma(k as f64 + 1.0) - ln_gamma((n - k) as f64 + 1.0)
}

/// P(X >= k) for X hypergeometric: `drawn` winners among `total` entrants, of whom `marked` are
/// marked (the bots). A small value means the marked ones won more than chance gives.
pub fn hypergeometric_tail(total: u64, drawn: u64, marked: u64, k: u64) -> f64 {
    let top = drawn.min(marked);
    if k == 0 {
        return 1.0;
    }
    let denom = ln_choose(total, drawn);
    (k..=top)
        .filter(|&i| drawn - i <= total - marked)
        .map(|i| (ln_choose(marked, i) + ln_choose(total - marked, drawn - i) - denom).exp())
        .sum::<f64>()
        .min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_gamma_matches_factorials() {
        assert!((ln_gamma(1.0)).abs() < 1e-12);
        assert!((ln_gamma(5.0) - 24f64.ln()).abs() < 1e-12);
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-12);
    }

    #[test]
    fn chi_square_p_values_match_the_tables() {
        // Upper tail of the chi-square distribution: Q(df/2, x/2).
        let p = |df: f64, x: f64| gamma_q(df / 2.0, x / 2.0);
        assert!((p(1.0, 3.841) - 0.05).abs() < 1e-3);
        assert!((p(9.0, 16.919) - 0.05).abs() < 1e-3);
        assert!((p(9.0, 27.877) - 0.001).abs() < 1e-4);
        assert!((p(2.0, 2.0) - (-1.0f64).exp()).abs() < 1e-12);
    }

    #[test]
    fn independence_tells_a_fair_draw_from_a_first_come_one() {
        let fair: Vec<(u64, u64)> = (0..10).map(|_| (200, 20)).collect();
        assert!(independence(&fair).1 > 0.99);
        // The first wave takes everything.
        let mut fcfs: Vec<(u64, u64)> = (0..10).map(|_| (200, 0)).collect();
        fcfs[0].1 = 200;
        assert!(independence(&fcfs).1 < 1e-12);
    }

    #[test]
    fn the_hypergeometric_tail_is_exact() {
        // 2 winners of 4 entrants, 2 marked: P(both marked win) = 1/6.
        assert!((hypergeometric_tail(4, 2, 2, 2) - 1.0 / 6.0).abs() < 1e-12);
        assert!((hypergeometric_tail(4, 2, 2, 1) - 5.0 / 6.0).abs() < 1e-12);
        // 200 bots among 2,200 entrants, 200 winners: about 18 expected; 60 is not chance.
        assert!(hypergeometric_tail(2200, 200, 200, 18) > 0.3);
        assert!(hypergeometric_tail(2200, 200, 200, 60) < 1e-9);
    }
}
