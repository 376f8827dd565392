//! A progress bar on stderr for long imports, drawn only on a terminal: a script reading
//! stderr gets the outcome, not a stream of carriage returns.

use std::io::Write;

pub struct Progress<'a> {
    to: Option<&'a mut dyn Write>,
    total: usize,
}

impl<'a> Progress<'a> {
    /// Draws on `to`, or nowhere when `None`.
    pub fn new(to: Option<&'a mut dyn Write>) -> Self {
        Self { to, total: 0 }
    }

    pub fn start(&mut self, total: usize) {
        self.total = total;
        self.show(0);
    }

    pub fn show(&mut self, done: usize) {
        let Some(to) = self.to.as_mut() else {
            return;
        };
        const WIDTH: usize = 30;
        let filled = (done * WIDTH).checked_div(self.total).unwrap_or(WIDTH);
        let bar = format!("{}{}", "#".repeat(filled), ".".repeat(WIDTH - filled));
        let _ = write!(to, "\r[{bar}] {done}/{} written", self.total);
        let _ = to.flush();
    }

    pub fn finish(&mut self) {
        if let Some(to) = self.to.as_mut() {
            let _ = writeln!(to);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_redraws_in_place_and_ends_the_line() {
        let mut out = Vec::new();
        {
            let mut progress = Progress::new(Some(&mut out));
            progress.start(200);
            progress.show(50);
            progress.show(200);
            progress.finish();
        }
        let text = String::from_utf8(out).unwrap();
        let frames: Vec<&str> = text
            .trim_end()
            .split('\r')
            .filter(|f| !f.is_empty())
            .collect();
        assert_eq!(
            frames,
            [
                "[..............................] 0/200 written",
                "[#######.......................] 50/200 written",
                "[##############################] 200/200 written",
            ]
        );
        assert!(text.ends_with('\n'));
        // Nowhere to draw (not a terminal, or --quiet): nothing happens.
        let mut silent = Progress::new(None);
        silent.start(10);
        silent.show(5);
        silent.finish();
    }
}
