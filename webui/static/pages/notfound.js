// The not-found page needs no script; the layout loads one module per page.
